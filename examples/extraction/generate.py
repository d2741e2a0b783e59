"""Generate the `extraction` downstream task (structured output).

Each example's `instruction` is a restaurant booking request written in free,
varied wording; `input` is empty; `output` is a compact one-line JSON object
with fixed keys in a fixed order:

    {"name": "Ana Ruiz", "party_size": 4, "day": "Friday", "time": "7pm", "restaurant": "Luigi's"}

`party_size` is an integer (the request may spell it as a digit or a word);
`day` is the weekday name; `time` is copied exactly as written in the request.
The output is produced with json.dumps(..., ensure_ascii=False), so it is
exactly reproducible and can be scored by exact match or per-field accuracy.

Stdlib only and fully seeded, so `python examples/extraction/generate.py`
rebuilds train.json / validation.json / test.json byte-for-byte.
"""
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/, for splits.py
from splits import write_splits  # noqa: E402

SEED = 4242
OUT_DIR = Path(__file__).resolve().parent

FIRST = ["Ana", "Tomas", "Priya", "Kwame", "Mei", "Oliver", "Fatima", "Lars", "Sofia", "Diego",
         "Hana", "Malik", "Elena", "Jonah", "Aisha", "Marco", "Ingrid", "Ravi", "Chloé", "Yusuf",
         "Nadia", "Felix", "Leila", "Owen", "Greta", "Samir", "Lucía", "Bruno", "Keiko", "Daniel",
         "Zoë", "Björn", "Amara", "Viktor", "Rosa", "Ethan", "Zara", "Hugo", "Mila", "Arjun"]
LAST = ["Ruiz", "Novak", "Sharma", "Mensah", "Chen", "Hartley", "Haddad", "Lindqvist", "Rossi",
        "Álvarez", "Sato", "Okafor", "Petrova", "Brennan", "Khan", "Bianchi", "Dahl", "Iyer",
        "Moreau", "Demir", "Weber", "Amini", "Price", "Holm", "Ortega", "Costa", "Fischer", "Cole",
        "Nakamura", "O'Brien", "García", "Kowalski", "Jensen", "Nguyen", "Silva", "Murphy"]
RESTAURANTS = ["Luigi's", "Café Rouge", "The Golden Lotus", "Sakura House", "El Toro", "Bistro Émile",
               "The Olive Tree", "Blue Lantern", "Casa Verde", "The Copper Pot", "Little Saigon",
               "The Salt House", "Mama Rosa", "The Hungry Heron", "Cedar Table", "Spice Route",
               "Noodle Bar 88", "The Red Fern", "Harbour Grill", "La Piazza", "Taj Palace",
               "The Green Fig", "Smokehouse 19", "Chez Marcel", "Ocean Pearl", "The Brass Duck",
               "Tandoor Nights", "Pho Real", "The Long Table", "Bella Vita"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
         9: "nine", 10: "ten", 11: "eleven", 12: "twelve"}

# Placeholders: {name} {n} (party size, digit or word) {day} {time} {r} (restaurant).
TEMPLATES = [
    "Please book a table for {n} at {r} on {day} at {time}, under the name {name}.",
    "Hi, could I reserve a table at {r} for {n} people this {day} around {time}? The name is {name}.",
    "{name} here. I'd like a table for {n} at {r}, {day} at {time}.",
    "Can you get us a table at {r}? We're a party of {n}, {day} at {time}, booking name {name}.",
    "Reservation request: {r}, {day}, {time}, {n} guests, name {name}.",
    "We'd love to eat at {r} on {day}. There will be {n} of us, arriving at {time}. Put it under {name}, please.",
    "Book {r} for {name}, party of {n}, {day} at {time}.",
    "Could you reserve {r} for {day} at {time}? It's for {n} people and the booking should be under {name}.",
    "Table for {n} at {r} please, {day} at {time}. Name: {name}.",
    "I'm {name}; please hold a table at {r} for {n} guests at {time} on {day}.",
    "Is there a free table at {r} at {time} on {day}? We are {n}. My name is {name}.",
    "Hello! {name} would like to book a meal for {n} at {r} next {day} at {time}.",
    "Please make a reservation under {name} at {r} for {n} people on {day} at {time}.",
    "Could we get a table for {n} at {r} at {time} this coming {day}? Reservation name: {name}.",
    "Just {n} of us. Can you book {r} for {day} at {time}? The name's {name}.",
    "Hey, put me down for a table at {r} on {day}, {time}, {n} people. I'm {name}.",
    "I need a table for {n} on {day} at {time} at {r}, in the name of {name}.",
    "Reserve a table at {r}, please. Day: {day}. Time: {time}. Guests: {n}. Name: {name}.",
    "{name} is booking for {n}: {r}, {day}, {time}.",
    "We're celebrating a birthday! Table for {n} at {r} on {day} at {time}, name {name}.",
    "Could {r} fit {n} of us in on {day} at {time}? Booking under {name}.",
    "Good morning, this is {name}. I'd like to book {r} for {day} at {time}, {n} people in total.",
    "My colleagues and I want to eat at {r} on {day}. We're {n} in total; {time} works best. Name: {name}.",
    "For {day} at {time}, please book {r} for a group of {n}. The reservation is for {name}.",
    "Hi there, {name} speaking. Any chance of a table for {n} at {r} this {day} at {time}?",
    "Please reserve seats for {n} at {r} at {time} on {day} for {name}.",
    "Booking for {name} at {r}: {n} diners, {day}, {time}.",
    "I'd like to take my family to {r} on {day} at {time}. We'll be {n}. The booking name is {name}.",
    "Could you arrange a table at {r} for {name}'s party of {n}, {day} at {time}?",
    "Need a reservation: {n} people, {r}, {time} on {day}. It's under {name}.",
    "Can I book {r} for this {day}? It's {n} people at {time}, name {name}. Thanks!",
    "Please note a booking at {r} for {day}, {time}, for {n} guests, name of {name}.",
]


def time_string(r):
    hour, minute = r.choice([11, 12, 12, 13, 13, 14, 17, 18, 18, 19, 19, 19, 20, 20, 21, 22]), r.choice([0, 0, 15, 30, 30, 45])
    if r.random() < 0.25:  # 24-hour clock
        return f"{hour}:{minute:02d}"
    h12, suffix = (hour - 12 if hour > 12 else hour), ("am" if hour < 12 else "pm")
    return f"{h12}{suffix}" if minute == 0 else f"{h12}:{minute:02d}{suffix}"


def make_example(r):
    name = f"{r.choice(FIRST)} {r.choice(LAST)}"
    size = r.choice([2, 2, 2, 3, 4, 4, 4, 5, 6, 6, 7, 8, 9, 10, 11, 12])
    day, time, rest = r.choice(DAYS), time_string(r), r.choice(RESTAURANTS)
    n = WORDS[size] if r.random() < 0.35 else str(size)
    text = r.choice(TEMPLATES).format(name=name, n=n, day=day, time=time, r=rest)
    text = text[0].upper() + text[1:]
    record = {"name": name, "party_size": size, "day": day, "time": time, "restaurant": rest}
    return {"instruction": text, "input": "", "output": json.dumps(record, ensure_ascii=False)}


def main():
    r = random.Random(SEED)
    write_splits(lambda: make_example(r), OUT_DIR)


if __name__ == "__main__":
    main()
