"""Write the MoE++ calibration text (templated) used by moepp_minilm_prototype.py.

Why templated: no internet datasets; templates over a broad hand-written vocabulary give
thousands of varied sentences. The eval file (moepp_eval_sentences.txt) is hand-written
prose kept separately; this script asserts the two sets are disjoint.
"""
from __future__ import annotations

import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "moh_compile" / "data"

PEOPLE = ["the teacher", "my neighbour", "a young doctor", "the old farmer", "our manager", "the pilot",
          "a tired student", "the chef", "my grandmother", "the mayor", "a local artist", "the engineer",
          "the nurse", "a street musician", "the lawyer", "her brother", "the coach", "a journalist",
          "the librarian", "two tourists", "the children", "the committee", "a small team", "the scientists"]
VERBS_T = ["repaired", "painted", "sold", "bought", "described", "ignored", "borrowed", "cleaned", "found",
           "lost", "designed", "tested", "measured", "carried", "ordered", "cooked", "photographed", "studied",
           "returned", "opened", "reviewed", "delivered", "shared", "replaced"]
THINGS = ["the bicycle", "an old map", "the kitchen table", "a broken phone", "the report", "a red umbrella",
          "the garden fence", "a wooden boat", "the new software", "a bag of apples", "the contract",
          "a letter from abroad", "the school roof", "a pair of boots", "the museum guide", "the budget",
          "a stack of invoices", "the radio", "a box of tools", "the wedding cake", "the train schedule",
          "a cheap laptop", "the family car", "the recipe"]
PLACES = ["in the city centre", "near the river", "at the airport", "behind the station", "in a quiet village",
          "at the hospital", "on the top floor", "in the park", "at the market", "by the sea",
          "in the mountains", "at the office", "in the library", "on the farm", "at the stadium",
          "in the basement", "across the border", "on the campus"]
TIMES = ["yesterday", "last winter", "this morning", "on Friday", "after lunch", "before the storm",
         "every weekend", "at midnight", "during the holidays", "two years ago", "in early spring",
         "late at night", "on a rainy afternoon", "last month"]
REASONS = ["because it was cheaper", "since nobody else would", "to save time", "although it was raining",
           "because the deadline moved", "after a long discussion", "without asking anyone",
           "to impress the guests", "because the old one failed", "as a favour to a friend"]
TOPICS = ["climate change", "the stock market", "football", "machine learning", "ancient history",
          "public transport", "healthy food", "space exploration", "modern art", "online privacy",
          "the housing crisis", "renewable energy", "classical music", "vaccines", "electric cars",
          "video games", "tax reform", "ocean pollution", "remote work", "language learning",
          "the election", "coffee prices", "wildlife protection", "quantum computers"]
ADJ = ["surprising", "boring", "useful", "confusing", "expensive", "important", "risky", "popular",
       "controversial", "simple", "beautiful", "dangerous", "slow", "reliable", "strange", "helpful"]
QWORDS = ["How do I", "Where can I", "Is it possible to", "What is the best way to", "Why should I",
          "Can someone explain how to", "When is it safe to"]
QACTIONS = ["reset my password", "renew a passport", "cook rice without a cooker", "learn to swim as an adult",
            "fix a leaking tap", "train a puppy", "invest a small amount of money", "write a cover letter",
            "install a new battery", "grow tomatoes indoors", "book a cheap flight", "back up my photos",
            "lower my electricity bill", "start running again", "clean a cast iron pan", "speed up my computer"]
PRODUCTS = ["headphones", "hotel", "restaurant", "phone case", "vacuum cleaner", "novel", "film", "coffee machine",
            "running shoes", "printer", "sofa", "airline"]
OPINIONS = ["was absolutely worth the money", "broke after two weeks", "exceeded my expectations",
            "was fine but nothing special", "had terrible customer service", "arrived late and damaged",
            "is the best I have ever used", "felt overpriced for what it offers", "works exactly as described",
            "was noisy and uncomfortable"]

ACTS = ["reading a newspaper", "cutting an onion", "playing the piano", "walking a dog", "climbing a wall",
        "feeding the ducks", "riding a horse", "washing a car", "typing on a laptop", "kicking a football",
        "pouring a drink", "slicing bread", "swimming in a lake", "waiting for a bus", "singing on a stage",
        "carrying a ladder", "drawing a picture", "talking on the phone"]
FIELDS = ["the economy", "unemployment", "crime", "exports", "housing prices", "the birth rate", "air quality",
          "traffic accidents", "tourism", "energy use", "school results", "rainfall"]
CHANGES = ["rose by three percent", "fell sharply", "remained stable", "doubled in five years",
           "reached a record high", "dropped to its lowest level in a decade", "grew faster than expected"]

TEMPLATES = [
    lambda r: f"A {r.choice(['man', 'woman', 'boy', 'girl', 'person', 'dog', 'group of people'])} is {r.choice(ACTS)} {r.choice(PLACES)}.",
    lambda r: f"According to the latest figures, {r.choice(FIELDS)} {r.choice(CHANGES)} {r.choice(TIMES)}.",
    lambda r: f"{r.choice(PEOPLE).capitalize()} was {r.choice(ACTS)} when the news about {r.choice(TOPICS)} arrived.",
    lambda r: f"Nobody expected that {r.choice(FIELDS)} {r.choice(CHANGES)}, {r.choice(REASONS)}.",
    lambda r: f"{r.choice(PEOPLE).capitalize()} {r.choice(VERBS_T)} {r.choice(THINGS)} {r.choice(PLACES)} {r.choice(TIMES)}.",
    lambda r: f"{r.choice(TIMES).capitalize()}, {r.choice(PEOPLE)} {r.choice(VERBS_T)} {r.choice(THINGS)} {r.choice(REASONS)}.",
    lambda r: f"The article about {r.choice(TOPICS)} was {r.choice(ADJ)} and {r.choice(ADJ)}.",
    lambda r: f"{r.choice(QWORDS)} {r.choice(QACTIONS)}?",
    lambda r: f"This {r.choice(PRODUCTS)} {r.choice(OPINIONS)}.",
    lambda r: f"{r.choice(PEOPLE).capitalize()} thinks that {r.choice(TOPICS)} is {r.choice(ADJ)}.",
    lambda r: f"We talked about {r.choice(TOPICS)} {r.choice(PLACES)} {r.choice(TIMES)}, and it was {r.choice(ADJ)}.",
    lambda r: f"If {r.choice(PEOPLE)} had not {r.choice(VERBS_T)} {r.choice(THINGS)}, we would have stayed {r.choice(PLACES)}.",
    lambda r: f"Experts say {r.choice(TOPICS)} will become more {r.choice(ADJ)} over the next decade.",
    lambda r: f"{r.choice(THINGS).capitalize()} was {r.choice(VERBS_T)} by {r.choice(PEOPLE)} {r.choice(REASONS)}.",
    lambda r: f"I {r.choice(VERBS_T)} {r.choice(THINGS)} {r.choice(TIMES)}; honestly the whole thing was {r.choice(ADJ)}.",
    lambda r: f"Breaking news: {r.choice(PEOPLE)} {r.choice(PLACES)} {r.choice(VERBS_T)} {r.choice(THINGS)}.",
]


def main(n: int = 4000, seed: int = 0) -> None:
    rng = random.Random(seed)
    seen: set[str] = set()
    while len(seen) < n:
        seen.add(rng.choice(TEMPLATES)(rng))
    lines = sorted(seen)
    rng.shuffle(lines)
    eval_path = DATA / "moepp_eval_sentences.txt"
    if eval_path.exists():
        evals = {s.strip() for s in eval_path.read_text().splitlines() if s.strip()}
        overlap = evals & set(lines)
        if overlap:
            raise ValueError(f"calibration and eval text overlap in {len(overlap)} sentences")
    (DATA / "moepp_calib_sentences.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} calibration sentences")


if __name__ == "__main__":
    main()
