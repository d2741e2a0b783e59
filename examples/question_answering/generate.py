"""Generate the `question_answering` downstream task (extractive QA).

Each example has a short fictional context paragraph in `input` (2-4
sentences, 40-70 words, about a company, festival, person, expedition,
village, match, restaurant or product launch), a question in `instruction`,
and the answer in `output`: an exact 1-4 word span copied from the context
(a name, number, date, place or object).

Stdlib only and fully seeded, so `python examples/question_answering/generate.py`
rebuilds train.json / validation.json / test.json byte-for-byte.
"""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/, for splits.py
from splits import write_splits  # noqa: E402

SEED = 1234
OUT_DIR = Path(__file__).resolve().parent

FIRST = ["Ana", "Tomas", "Priya", "Kwame", "Mei", "Oliver", "Fatima", "Lars", "Sofia", "Diego",
         "Hana", "Malik", "Elena", "Jonah", "Aisha", "Marco", "Ingrid", "Ravi", "Chloe", "Yusuf",
         "Nadia", "Felix", "Leila", "Owen", "Greta", "Samir", "Lucia", "Bruno", "Keiko", "Daniel",
         "Amara", "Viktor", "Rosa", "Ethan", "Zara", "Hugo", "Mila", "Arjun", "Clara", "Tariq"]
LAST = ["Ruiz", "Novak", "Sharma", "Mensah", "Chen", "Hartley", "Haddad", "Lindqvist", "Rossi",
        "Alvarez", "Sato", "Okafor", "Petrova", "Brennan", "Khan", "Bianchi", "Dahl", "Iyer",
        "Moreau", "Demir", "Farouk", "Weber", "Amini", "Price", "Holm", "Nasser", "Ortega", "Costa",
        "Tanaka", "Fischer", "Adeyemi", "Volkov", "Marin", "Cole", "Qureshi", "Laurent", "Berg"]
CITIES = ["Port Ellery", "Maravel", "Oslo", "Kingsbridge", "Valdora", "Lisbon", "Brightwater",
          "Tamsworth", "Nairobi", "Calder Bay", "Osaka", "Redfield", "Montreal", "Ashford Hill",
          "Santa Lucia", "Greystone", "Lyon", "Hollowmere", "Perth", "Eastwick", "Cordova",
          "Millbrook", "Bergen", "Stonehaven", "Riverton", "Quito", "Westmarch", "Dunmore"]
CO_A = ["Blue Harbor", "Northwind", "Silverleaf", "Redstone", "Bright Oak", "Clearwater",
        "Ironbark", "Sunpeak", "Greenfield", "Moonstone", "Copperline", "Whitecliff", "Lumen", "Kestrel"]
CO_B = ["Labs", "Foods", "Robotics", "Textiles", "Motors", "Studios", "Games", "Bikes", "Optics", "Toys"]
PRODUCTS = ["garden tools", "electric bicycles", "wooden toys", "solar lamps", "running shoes",
            "board games", "kitchen knives", "smart watches", "rain jackets", "office chairs",
            "camping stoves", "children's books", "hearing aids", "coffee machines"]
ANIMALS = ["fox", "heron", "owl", "wolf", "dolphin", "hare", "falcon", "bear", "swan", "lynx"]
COLORS = ["red", "blue", "green", "golden", "silver", "black", "yellow", "purple"]
OBJECTS = ["silver trophy", "bronze bell", "painted kite", "wooden chest", "glass lantern",
           "brass compass", "woollen blanket", "copper kettle", "leather saddle", "clay vase",
           "pocket watch", "carved mask", "golden medal", "stone tablet", "faded map"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
SUBJECTS = ["chemistry", "history", "music", "architecture", "biology", "economics",
            "mathematics", "law", "geology", "philosophy", "nursing", "engineering"]
JOBS = ["teacher", "baker", "nurse", "pilot", "carpenter", "journalist", "librarian",
        "photographer", "lawyer", "chef", "mechanic", "fisherman"]
RIVERS = ["Alder", "Tamsin", "Morrow", "Vell", "Ouse", "Serran", "Kettle", "Linden", "Brae", "Corrin"]
SPECIALTIES = ["cheese", "apple cider", "lace", "pottery", "honey", "wool", "glassware", "sausages"]
TEAMS = ["Riverton Rovers", "Calder Bay United", "Redfield Town", "Greystone Athletic",
         "Eastwick City", "Millbrook Wanderers", "Dunmore Albion", "Westmarch FC", "Stonehaven Rangers"]
CUPS = ["Coastal Cup", "Northern Shield", "Harbour Trophy", "Valley Cup", "Founders Cup"]
CUISINES = ["Italian", "Thai", "Lebanese", "Mexican", "Japanese", "Greek", "Ethiopian", "Peruvian"]
RESTAURANTS = ["The Olive Tree", "Blue Lantern", "Casa Verde", "The Copper Pot", "Little Saigon",
               "The Salt House", "Golden Spoon", "Mama Rosa", "The Hungry Heron", "Cedar Table"]
DISHES = ["lamb stew", "lemon tart", "seafood soup", "spicy noodles", "mushroom risotto",
          "fried chicken", "chocolate cake", "grilled fish", "bean chili", "apple pie"]
DEVICES = ["pocket drone", "smart kettle", "folding scooter", "translation earpiece",
           "robot vacuum", "e-reader", "solar charger", "fitness ring"]
MODELS = ["Zephyr", "Nimbus", "Orbit", "Falcon", "Pixel", "Nova", "Atlas", "Echo", "Comet", "Vega"]
VEHICLES = ["canoe", "camel", "sled", "jeep", "horseback", "bicycle", "boat", "train"]
PLACES = ["the Sorrel Desert", "Mount Karran", "the Vell Glacier", "the Moss Islands",
          "the Tarn Valley", "the Ember Caves", "Lake Ondra", "the Grey Forest"]


def person(r):
    return f"{r.choice(FIRST)} {r.choice(LAST)}"


def article(word):
    return "an" if word[0].lower() in "aeiou" else "a"


def date(r):
    return f"{r.randint(1, 28)} {r.choice(MONTHS)} {r.randint(1960, 2023)}"


def company(r):
    p, co, city, year = person(r), f"{r.choice(CO_A)} {r.choice(CO_B)}", r.choice(CITIES), str(r.randint(1950, 2022))
    n, prod, animal, color = str(r.randint(12, 4800)), r.choice(PRODUCTS), r.choice(ANIMALS), r.choice(COLORS)
    s1 = r.choice([f"{co} was founded in {year} by {p} in {city}.",
                   f"{p} started {co} in {city} back in {year}.",
                   f"In {year}, {p} launched {co} from a small office in {city}."])
    s2 = r.choice([f"The company makes {prod} and now employs {n} people.",
                   f"Today the firm sells {prod} and has {n} employees."])
    s3 = r.choice([f"Its logo, a {color} {animal}, was drawn by the founder's daughter.",
                   f"The company's mascot is a cheerful {color} {animal} that appears on every box."])
    s4 = r.choice(["Most of its sales now happen online.", "It plans to open a second factory next year.",
                   "Customers often praise its friendly service and fast delivery."])
    qs = [(f"Who founded {co}?", p), (f"Who started {co}?", p),
          (f"In which city was {co} founded?", city), (f"Where did {co} begin?", city),
          (f"In what year was {co} founded?", year), (f"When was {co} started?", year),
          (f"How many people does {co} employ?", n), (f"How many employees does {co} have?", n),
          (f"What does {co} make?", prod), (f"What animal appears on the {co} {'logo' if 'logo' in s3 else 'mascot'}?", animal)]
    return [s1, s2, s3, s4], qs


def festival(r):
    kind = r.choice(["Kite", "Jazz", "Lantern", "Cheese", "Film", "Folk", "Boat", "Poetry"])
    name = f"{r.choice([c for c in CITIES if ' ' not in c])} {kind} Festival"
    city, month, year, p = r.choice(CITIES), r.choice(MONTHS), str(r.randint(1900, 2015)), person(r)
    n, job, prize = f"{r.randint(2, 90)},000", r.choice(JOBS), r.choice(OBJECTS)
    s1 = r.choice([f"The {name} is held every {month} in {city}.",
                   f"Every {month}, {city} hosts the {name}."])
    s2 = r.choice([f"It was first organised in {year} by {p}, a local {job}.",
                   f"A {job} named {p} started the event in {year}."])
    s3 = r.choice([f"Last year it drew about {n} visitors, and the top prize was a {prize}.",
                   f"Around {n} people attend each year, and the winner takes home a {prize}."])
    s4 = r.choice(["Local hotels are usually fully booked for the whole week.",
                   "Volunteers spend months preparing the streets and stalls beforehand.",
                   "Tickets are free for children under twelve."])
    qs = [(f"Where is the {name} held?", city), (f"In which month does the {name} take place?", month),
          (f"In what year was the {name} first organised?", year), (f"Who started the {name}?", p),
          (f"How many visitors does the {name} attract?", n), (f"What is the top prize at the {name}?", prize),
          (f"What was the job of the person who started the {name}?", job)]
    return [s1, s2, s3, s4], qs


def biography(r):
    p, city, city2 = person(r), *r.sample(CITIES, 2)
    subj, year, job, k = r.choice(SUBJECTS), str(r.randint(1970, 2018)), r.choice(JOBS), str(r.randint(2, 30))
    obj, (pro, pos) = r.choice(OBJECTS), r.choice([("She", "her"), ("He", "his")])
    s1 = r.choice([f"{p} grew up in {city} and studied {subj} at university.",
                   f"Born and raised in {city}, {p} went on to study {subj}."])
    s2 = r.choice([f"In {year}, {pro.lower()} moved to {city2} and worked as a {job} for {k} years.",
                   f"{pro} settled in {city2} in {year} and spent {k} years working as a {job}."])
    s3 = r.choice([f"{pro} still keeps an old {obj} that belonged to {pos} grandmother.",
                   f"Friends say {pro.lower()} never travels without a {obj}."])
    s4 = r.choice([f"These days {pro.lower()} spends most weekends hiking with friends.",
                   f"{pro} is now writing a short book about {pos} childhood."])
    qs = [(f"Where did {p} grow up?", city), (f"What did {p} study?", subj),
          (f"Which city did {p} move to?", city2), (f"In what year did {p} move?", year),
          (f"How many years did {p} work as a {job}?", k), (f"What job did {p} do?", job),
          (f"What object is mentioned in connection with {p}?", obj)]
    return [s1, s2, s3, s4], qs


def expedition(r):
    p, d, n, k = person(r), date(r), str(r.randint(3, 40)), str(r.randint(4, 90))
    place, veh, obj, city = r.choice(PLACES), r.choice(VEHICLES), r.choice(OBJECTS), r.choice(CITIES)
    s1 = r.choice([f"On {d}, {p} led a team of {n} explorers from {city} to {place}.",
                   f"{p} set out from {city} for {place} on {d} with {n} companions."])
    s2 = f"The journey took {k} days, and most of it was made by {veh}."
    s3 = r.choice([f"Their most surprising find was a {obj} buried near their camp.",
                   f"Near the end of the trip they discovered a {obj} in an abandoned hut."])
    s4 = r.choice(["Two members of the team later wrote a book about the trip.",
                   "Everyone returned home safely despite several fierce storms."])
    qs = [(f"When did the expedition to {place} begin?", d), (f"Who led the expedition to {place}?", p),
          ("How many people were in the team besides the leader?" if "companions" in s1 else "How many explorers were in the team?", n),
          ("How many days did the journey take?", k), ("How did the team mostly travel?", veh),
          ("What did the team find?", obj), (f"Where did {p}'s expedition start from?", city)]
    return [s1, s2, s3, s4], qs


def village(r):
    town, river, n = r.choice(CITIES), r.choice(RIVERS), f"{r.randint(1, 9)},{r.randint(100, 999)}"
    spec, p, year = r.choice(SPECIALTIES), person(r), str(r.randint(1995, 2023))
    s1 = r.choice([f"{town} is a quiet town on the banks of the {river} River.",
                   f"The small town of {town} lies where the {river} River meets the hills."])
    s2 = r.choice([f"It has a population of about {n} and is famous for its {spec}.",
                   f"Around {n} people live there, and visitors come for its {spec}."])
    s3 = r.choice([f"The current mayor, {p}, was elected in {year}.",
                   f"Since {year}, the town has been led by mayor {p}."])
    s4 = r.choice(["A weekly market is held in the main square every Saturday.",
                   "The old stone bridge in the centre is more than three hundred years old."])
    qs = [(f"Which river flows past {town}?", river), (f"What is the population of {town}?", n),
          (f"What is {town} famous for?", spec), (f"Who is the mayor of {town}?", p),
          (f"When was the mayor of {town} elected?", year), (f"How many people live in {town}?", n)]
    return [s1, s2, s3, s4], qs


def match(r):
    t1, t2 = r.sample(TEAMS, 2)
    cup, d, p, mins = r.choice(CUPS), date(r), person(r), str(r.randint(3, 89))
    city, fans, a = r.choice(CITIES), f"{r.randint(2, 60)},000", r.randint(1, 5)
    s1 = f"{t1} beat {t2} {a}-{r.randint(0, a - 1)} in the final of the {cup} on {d}."
    s2 = f"The winning goal was scored by {p} after {mins} minutes."
    s3 = r.choice([f"The match was played in {city} in front of {fans} fans.",
                   f"About {fans} supporters watched the game in {city}."])
    s4 = r.choice(["It was the club's first major trophy in over a decade.",
                   "The celebrations in the streets went on until late at night."])
    qs = [(f"Which team won the {cup} final?", t1), (f"Which team lost the {cup} final?", t2),
          ("Who scored the winning goal?", p), ("After how many minutes was the winning goal scored?", mins),
          ("Where was the match played?", city), ("How many fans watched the match?", fans),
          (f"When was the {cup} final played?", d)]
    return [s1, s2, s3, s4], qs


def restaurant(r):
    p, chef, rest, cui = person(r), person(r), r.choice(RESTAURANTS), r.choice(CUISINES)
    city, year, n, dish = r.choice(CITIES), str(r.randint(1980, 2023)), str(r.randint(6, 45)), r.choice(DISHES)
    s1 = r.choice([f"{p} opened {rest}, a small {cui} restaurant in {city}, in {year}.",
                   f"In {year}, {p} opened {article(cui)} {cui} restaurant called {rest} in {city}."])
    s2 = f"The dining room has {n} tables, and regulars always order the {dish}."
    s3 = r.choice([f"The kitchen is run by head chef {chef}.", f"Its head chef, {chef}, trained abroad for years."])
    s4 = r.choice(["Booking a table on weekends can take several weeks.",
                   "A local newspaper once called it the best place to eat in the region."])
    qs = [(f"Who opened {rest}?", p), (f"Who is the head chef at {rest}?", chef),
          (f"In which city is {rest}?", city), (f"When did {rest} open?", year),
          (f"How many tables does {rest} have?", n), (f"What dish do regulars order at {rest}?", dish),
          (f"What kind of food does {rest} serve?", cui)]
    return [s1, s2, s3, s4], qs


def launch(r):
    co, dev, model = f"{r.choice(CO_A)} {r.choice(CO_B)}", r.choice(DEVICES), f"{r.choice(MODELS)} {r.randint(2, 9)}"
    city, d, grams, price, p = r.choice(CITIES), date(r), f"{r.randint(40, 900)} grams", f"${r.randint(19, 499)}", person(r)
    s1 = r.choice([f"{co} unveiled the {model}, a new {dev}, at a trade fair in {city} on {d}.",
                   f"On {d}, {co} showed off its new {dev}, the {model}, in {city}."])
    s2 = f"The device weighs {grams} and will cost {price}."
    s3 = r.choice([f"It was designed by engineer {p}.", f"Engineer {p} led the design team."])
    s4 = r.choice(["Shops will start selling it early next year.",
                   "Early reviewers praised its long battery life and simple controls."])
    qs = [(f"What is the name of the new {dev} from {co}?", model), (f"Where was the {model} unveiled?", city),
          (f"When was the {model} unveiled?", d), (f"Who designed the {model}?", p),
          (f"How much will the {model} cost?", price), (f"How much does the {model} weigh?", grams),
          (f"What kind of device is the {model}?", dev)]
    return [s1, s2, s3, s4], qs


FRAMES = [company, festival, biography, expedition, village, match, restaurant, launch]


def make_example(r):
    while True:
        sentences, qs = r.choice(FRAMES)(r)
        context = " ".join(sentences)
        question, answer = r.choice(qs)
        if 40 <= len(context.split()) <= 70 and answer in context and len(answer.split()) <= 4:
            return {"instruction": question, "input": context, "output": answer}


def main():
    r = random.Random(SEED)
    write_splits(lambda: make_example(r), OUT_DIR)


if __name__ == "__main__":
    main()
