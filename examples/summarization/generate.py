"""Generate the `summarization` downstream task (news headline writing).

Each example has a short news-style paragraph in `input` (3-4 sentences,
50-80 words), a lightly varied request for a headline in `instruction`, and
a one-line headline (6-12 words) in `output`. Every story type has a fixed
headline pattern filled from the paragraph's first-sentence facts (for
example "<Org> opens new <facility> in <City>"), so the headline is
predictable from the text and a finetuned model can reach a high ROUGE-L.

Stdlib only and fully seeded, so `python examples/summarization/generate.py`
rebuilds train.json / validation.json / test.json byte-for-byte.
"""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/, for splits.py
from splits import write_splits  # noqa: E402

SEED = 2024
OUT_DIR = Path(__file__).resolve().parent

INSTRUCTIONS = ["Write a one-line headline for this news story.",
                "Write a short headline for the following news story.",
                "Give this news story a one-line headline.",
                "Summarize this news story as a one-line headline."]
FIRST = ["Ana", "Tomas", "Priya", "Kwame", "Mei", "Oliver", "Fatima", "Lars", "Sofia", "Diego",
         "Hana", "Malik", "Elena", "Jonah", "Aisha", "Marco", "Ingrid", "Ravi", "Chloe", "Yusuf",
         "Nadia", "Felix", "Leila", "Owen", "Greta", "Samir", "Lucia", "Bruno", "Keiko", "Daniel"]
LAST = ["Ruiz", "Novak", "Sharma", "Mensah", "Chen", "Hartley", "Haddad", "Lindqvist", "Rossi",
        "Alvarez", "Sato", "Okafor", "Petrova", "Brennan", "Khan", "Bianchi", "Dahl", "Iyer",
        "Moreau", "Demir", "Weber", "Amini", "Price", "Holm", "Ortega", "Costa", "Fischer", "Cole"]
CITIES = ["Port Ellery", "Maravel", "Kingsbridge", "Valdora", "Brightwater", "Tamsworth",
          "Calder Bay", "Redfield", "Ashford Hill", "Santa Lucia", "Greystone", "Hollowmere",
          "Eastwick", "Cordova", "Millbrook", "Stonehaven", "Riverton", "Westmarch", "Dunmore", "Lakeport"]
ORG_A = ["Blue Harbor", "Northwind", "Silverleaf", "Redstone", "Bright Oak", "Clearwater",
         "Ironbark", "Sunpeak", "Greenfield", "Moonstone", "Copperline", "Whitecliff", "Kestrel", "Lumen"]
ORG_B = ["Foods", "Motors", "Robotics", "Textiles", "Energy", "Pharma", "Logistics", "Games", "Bank", "Airways"]
FACILITIES = ["factory", "warehouse", "research centre", "headquarters", "data centre", "training school"]
PRODUCTS = ["electric kettles", "baby strollers", "bicycle helmets", "space heaters",
            "phone chargers", "toy robots", "hair dryers", "pressure cookers"]
FAULTS = ["faulty batteries", "loose screws", "a wiring fault", "overheating risks", "a choking hazard"]
TEAMS = ["Riverton Rovers", "Calder Bay United", "Redfield Town", "Greystone Athletic",
         "Eastwick City", "Millbrook Wanderers", "Dunmore Albion", "Westmarch FC"]
CUPS = ["Coastal Cup", "Northern Shield", "Harbour Trophy", "Valley Cup", "Founders Cup"]
MUSEUMS = ["City Art Museum", "Riverside Gallery", "National History Museum", "Harbour Museum",
           "Old Mill Gallery", "Science Museum"]
TOPICS = ["ancient Egypt", "early aviation", "Viking ships", "modern photography",
          "deep sea life", "Roman coins", "space travel", "medieval maps"]
BUILDINGS = ["historic warehouse", "primary school", "family bakery", "old cinema",
             "furniture shop", "sports hall", "village church"]
WORKERS = ["Bus drivers", "Nurses", "Teachers", "Postal workers", "Airport staff", "Train drivers"]
DISPUTES = ["pay", "working hours", "pensions", "staff shortages", "job cuts"]
CHARITIES = ["Hope Bridge", "Open Hands Trust", "Little Lights", "Second Harvest", "Kind Heart Fund"]
CAUSES = ["children's hospitals", "flood victims", "local food banks", "animal shelters", "homeless families"]
EVENTS = ["charity run", "gala dinner", "bake sale", "music night", "auction"]
RIVERS = ["Alder", "Tamsin", "Morrow", "Vell", "Serran", "Kettle", "Linden", "Corrin"]
UNIS = ["Kingsbridge University", "Valdora Institute", "Riverton College", "Eastwick University"]
INVENTIONS = [("blood test for diabetes", "could speed up diagnosis"),
              ("drought-resistant wheat", "could help farmers in dry regions"),
              ("battery for electric cars", "charges in ten minutes"),
              ("vaccine for bird flu", "passed its first safety trial"),
              ("plastic made from seaweed", "breaks down within weeks"),
              ("app for early hearing loss", "works on ordinary phones")]
CLOSERS = ["More details are expected to be shared with the public later this week.",
           "The news was first reported by the local evening paper on its website.",
           "Reporters were told that further updates would follow in the coming days.",
           "A full statement has been published on the official website.",
           "Reactions on social media were mixed, with many people asking for more information."]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "March", "April", "June", "September", "October", "November"]


def person(r):
    return f"{r.choice(FIRST)} {r.choice(LAST)}"


def org(r):
    return f"{r.choice(ORG_A)} {r.choice(ORG_B)}"


def money(r):
    return f"${r.randint(2, 95)} million"


def story(r):
    """Return (first-sentence variants, follow-up sentences, headline) for one random story."""
    o, o2, c, d, p, p2 = org(r), org(r), r.choice(CITIES), r.choice(DAYS), person(r), person(r)
    m, n, k, pct = money(r), r.randint(40, 900), r.randint(3, 20), r.randint(3, 15)
    kind = r.randrange(15)
    if kind == 0:
        f = r.choice(FACILITIES)
        return ([f"{o} opened a new {f} in {c} on {d}.", f"On {d}, {o} officially opened its new {f} in {c}."],
                [f"The company said the site will create {n} jobs over the next two years.",
                 f"The project cost about {m} and was finished ahead of schedule.",
                 f"Chief executive {p} called the opening a big step for the business and the region."],
                f"{o} opens new {f} in {c}")
    if kind == 1:
        return ([f"{o} has agreed to buy {o2} for {m}, the companies said on {d}.",
                 f"In a deal announced on {d}, {o} will buy its smaller rival {o2} for {m}."],
                [f"{o2} is based in {c} and employs about {n} people.",
                 f"The deal still needs approval from regulators and is expected to close by {r.choice(MONTHS)}.",
                 f"{p}, who leads {o}, said the two firms share the same values and goals."],
                f"{o} buys {o2} for {m}")
    if kind == 2:
        prod = r.choice(PRODUCTS)
        return ([f"{o} said on {d} that it will cut {n} jobs at its site in {c}.",
                 f"About {n} workers at the {c} site of {o} will lose their jobs, the company said on {d}."],
                [f"The company blamed falling demand for its {prod} and rising energy costs.",
                 "Union officials called the decision a heavy blow to the whole area.",
                 f"Local council leader {p} promised to help the affected families find new work."],
                f"{o} to cut {n} jobs in {c}")
    if kind == 3:
        return ([f"{p} has been elected mayor of {c} after winning {pct + 40} percent of the vote.",
                 f"Voters in {c} chose {p} as their new mayor in an election held on {d}."],
                [f"The new mayor defeated {p2}, who had held the post for the past {k} years.",
                 "Turnout was the highest the city has seen in more than two decades.",
                 "The first promise of the new mayor is cheaper and more frequent public transport."],
                f"{p} wins {c} mayoral election")
    if kind == 4:
        t1, t2 = r.sample(TEAMS, 2)
        cup, a = r.choice(CUPS), r.randint(1, 5)
        score = f"{a}-{r.randint(0, a - 1)}"
        return ([f"{t1} won the {cup} on {d} after beating {t2} {score} in {c}.",
                 f"{t1} are the new {cup} champions after a {score} victory over {t2} on {d}."],
                [f"Striker {p} scored twice for the winners, including a late header.",
                 f"About {n * 50} fans packed the stadium in {c} to watch the final.",
                 "It was the first major trophy for the club in more than a decade."],
                f"{t1} beat {t2} to win {cup}")
    if kind == 5:
        prod, fault = r.choice(PRODUCTS), r.choice(FAULTS)
        return ([f"{o} is recalling {n} {prod} over {fault}, the company said on {d}.",
                 f"On {d}, {o} announced a recall of {n} {prod} over {fault}."],
                ["No serious injuries have been reported so far, according to the company.",
                 "Customers can return the items to any shop for a full refund or a replacement.",
                 f"Safety officials in {c} said the recall was the right decision."],
                f"{o} recalls {n} {prod} over {fault}")
    if kind == 6:
        return ([f"Bus fares in {c} will rise by {pct} percent from {r.choice(MONTHS)}, the city council said on {d}.",
                 f"The city council in {c} has decided to raise bus fares by {pct} percent."],
                [f"A single adult ticket will cost ${r.randint(2, 4)}.{r.choice(['10', '25', '50', '75'])} under the new prices.",
                 "Officials blamed higher fuel prices and staff costs for the increase.",
                 f"Passenger group leader {p} called the rise unfair on people with low incomes."],
                f"{c} raises bus fares by {pct} percent")
    if kind == 7:
        mus, topic = r.choice(MUSEUMS), r.choice(TOPICS)
        return ([f"The {mus} in {c} opened a new exhibition on {topic} on {d}.",
                 f"A new exhibition on {topic} opened at the {mus} in {c} on {d}."],
                [f"It includes more than {n} objects, many of them shown to the public for the first time.",
                 f"Curator {p} spent {k} years preparing the show with experts from abroad.",
                 "Entry is free for students and children until the end of the year."],
                f"{mus} opens exhibition on {topic} in {c}")
    if kind == 8:
        b = r.choice(BUILDINGS)
        return ([f"An overnight fire destroyed a {b} in {c} on {d}.",
                 f"A {b} in {c} was destroyed by an overnight fire on {d}."],
                ["No one was hurt, but several nearby homes were evacuated as a precaution.",
                 f"About {k * 5} firefighters worked for hours to bring the flames under control.",
                 f"Police officer {p} said the cause of the fire is still under investigation."],
                f"Overnight fire destroys {b} in {c}")
    if kind == 9:
        w, dis = r.choice(WORKERS), r.choice(DISPUTES)
        return ([f"{w} in {c} went on strike on {d} in a dispute over {dis}.",
                 f"On {d}, {w.lower()} in {c} walked out in a long-running row over {dis}."],
                [f"Union leader {p} said talks with employers had broken down last week.",
                 f"The strike is expected to last {k} days and will cause major disruption.",
                 "City officials urged both sides to return to talks as soon as possible."],
                f"{w} in {c} strike over {dis}")
    if kind == 10:
        return ([f"{o} has named {p} as its new chief executive, the company said on {d}.",
                 f"{p} will become the new chief executive of {o}, the company announced on {d}."],
                [f"The new boss replaces {p2}, who is retiring after {k} years in the job.",
                 f"Shares of {o} rose {pct} percent after the news was announced.",
                 f"{p} previously ran a smaller company in {c} for several years."],
                f"{o} names {p} as new chief executive")
    if kind == 11:
        ch, cause, ev = r.choice(CHARITIES), r.choice(CAUSES), r.choice(EVENTS)
        amt = f"${r.randint(10, 900)},000"
        return ([f"The charity {ch} raised {amt} for {cause} at its annual {ev} in {c}.",
                 f"A {ev} held by {ch} in {c} on {d} raised {amt} for {cause}."],
                [f"More than {n} people took part this year, a new record for the event.",
                 f"Organiser {p} thanked local businesses and volunteers for their support.",
                 "The money will be shared out among several projects before the winter."],
                f"{ch} raises {amt} for {cause}")
    if kind == 12:
        prod = r.choice(PRODUCTS)
        return ([f"{o} reported a record yearly profit of {m} on {d}, helped by strong sales of {prod}.",
                 f"Strong sales of {prod} helped {o} post a record yearly profit of {m}, it said on {d}."],
                [f"Chief executive {p} said demand grew fastest in {c} and nearby towns.",
                 f"The company now plans to hire {n} new staff over the coming year.",
                 "Its shares rose sharply after the results were published."],
                f"{o} reports record profit of {m}")
    if kind == 13:
        river = r.choice(RIVERS)
        return ([f"A new bridge over the {river} River opened in {c} on {d}.",
                 f"On {d}, {c} opened its long-awaited new bridge over the {river} River."],
                [f"The bridge cost {m} and took {k} months to build.",
                 f"Engineers expect it to carry about {n * 20} cars a day and to ease traffic in the centre.",
                 f"Mayor {p} cut the ribbon in front of a large and cheerful crowd."],
                f"New bridge over {river} River opens in {c}")
    uni, (inv, benefit) = r.choice(UNIS), r.choice(INVENTIONS)
    return ([f"Scientists at {uni} have developed a new {inv} that {benefit}.",
             f"A new {inv} that {benefit} has been developed by scientists at {uni}."],
            [f"The research team was led by Professor {p} and included experts from {c}.",
             f"The work took {k} years and was funded with {m} from public grants.",
             "The results were published in a leading scientific journal this week."],
            f"{uni} scientists develop new {inv}")


def make_example(r):
    while True:
        first, extras, headline = story(r)
        if r.random() < 0.3:  # sometimes swap the last follow-up for a generic closing line
            extras = extras[:2] + [r.choice(CLOSERS)]
        text = " ".join([r.choice(first)] + extras)
        if 50 <= len(text.split()) <= 80 and 6 <= len(headline.split()) <= 12:
            return {"instruction": r.choice(INSTRUCTIONS), "input": text, "output": headline}


def main():
    r = random.Random(SEED)
    write_splits(lambda: make_example(r), OUT_DIR)


if __name__ == "__main__":
    main()
