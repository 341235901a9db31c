"""Write the calibration and held-out evaluation sentence files for the MoH prototype.

Why generated: no internet or datasets here. Sentences are hand-written (varied registers) plus
combinatorial template fills; calibration and evaluation use DIFFERENT template families and
different hand-written sentences, and are checked disjoint. Deterministic (seeded).

    python examples/make_moh_sentences.py
"""
from __future__ import annotations

import random
from pathlib import Path

HAND_CALIB = """\
The weather forecast says it will rain heavily tomorrow afternoon.
Can you recommend a good book about the history of mathematics?
She finally finished her thesis after four long years of research.
The stock market fell sharply after the central bank raised interest rates.
My grandmother makes the best apple pie in the whole county.
How do I reset my password if I no longer have access to my email?
The new smartphone has a larger battery and a faster processor.
Scientists discovered a new species of frog in the rainforest.
He forgot his umbrella on the train again.
Please remember to water the plants while I am away.
The museum is closed on Mondays and public holidays.
Our team won the championship in the last minute of the game.
The recipe calls for two cups of flour and a pinch of salt.
Traffic was terrible this morning because of the accident on the highway.
The children built a sandcastle near the edge of the water.
Why does the sky look red at sunset?
The software update fixed several security vulnerabilities.
I have been learning to play the guitar for about six months.
The committee will announce its decision next week.
A large crowd gathered in the square to watch the fireworks.
The train to the airport leaves every fifteen minutes.
Drinking enough water is important for your health.
The company plans to open three new offices in Asia next year.
Is it safe to swim in the lake during a thunderstorm?
The old bridge was replaced by a modern steel structure.
They adopted a small dog from the local animal shelter.
The professor explained the theory using simple examples.
Electric cars are becoming more popular in many countries.
The hotel room had a beautiful view of the mountains.
I could not sleep because the neighbours were having a party.
The volcano erupted for the first time in over a century.
Add the onions to the pan and cook until they are golden.
The library offers free internet access to all visitors.
What time does the pharmacy open on Sunday?
The orchestra performed a symphony by Beethoven.
Researchers trained a neural network to detect tumours in medical images.
The farmer harvested the wheat before the storm arrived.
She speaks French, Spanish and a little bit of Japanese.
The price of coffee has doubled over the past two years.
Please close the window, it is getting cold in here.
The marathon runners passed through the city centre at noon.
Our flight was delayed by three hours due to fog.
The database query returned more rows than expected.
He painted the fence white to match the house.
The documentary follows a family of elephants across the savanna.
My laptop keeps overheating when I play video games.
The city council approved the budget for the new park.
A good night's sleep can improve your memory.
The detective found a hidden message inside the old letter.
We should leave early to avoid the rush hour.
The kernel panicked after loading the faulty driver.
Photosynthesis converts sunlight into chemical energy.
The baby laughed when the cat jumped onto the sofa.
Do you know where I can buy fresh bread around here?
The election results will be announced tonight.
The glacier has been shrinking steadily for decades.
He apologised for arriving late to the meeting.
The function returns an empty list when the input is invalid.
Bees play an essential role in pollinating crops.
The restaurant serves traditional dishes from southern Italy.
"""

HAND_EVAL = """\
The storm knocked out power to thousands of homes overnight.
Where is the nearest train station from the hotel?
He spent the weekend repairing his grandfather's old motorcycle.
The central bank kept interest rates unchanged this quarter.
A cup of green tea in the morning helps me wake up.
How can I improve my writing skills in a foreign language?
The telescope captured images of a distant galaxy.
She lost her keys somewhere between the office and the gym.
The concert was cancelled because the singer was ill.
Tomatoes grow best in warm weather with plenty of sunlight.
The startup raised fifty million dollars in its latest funding round.
Is it possible to learn programming without a computer science degree?
The river flooded the village after days of heavy rain.
My brother is afraid of spiders and snakes.
The airline lost my luggage on the way to Berlin.
The compiler reported a type error on line forty two.
Regular exercise reduces the risk of heart disease.
The students protested against the increase in tuition fees.
We watched a documentary about deep sea creatures last night.
The bakery on the corner sells delicious croissants.
The satellite entered orbit around Mars after a long journey.
Could you explain how vaccines train the immune system?
The old castle attracts thousands of tourists every summer.
He proposed to her on top of the mountain at sunrise.
The police are investigating a series of burglaries in the area.
The garden is full of roses, tulips and sunflowers.
Memory leaks can slowly degrade the performance of a server.
The teacher asked the class to read the first chapter by Friday.
Wind turbines generate electricity without burning fuel.
I prefer reading paper books rather than ebooks.
The referee showed a red card in the second half.
The soup needs more salt and a little pepper.
A sudden earthquake shook the coastal town early on Tuesday.
The translation app struggles with idioms and slang.
Our neighbours are renovating their kitchen this month.
What is the difference between weather and climate?
The chess champion defended her title for the third time.
The pipeline failed because a dependency was missing.
Whales communicate with each other using complex songs.
The factory will cut production due to the shortage of chips.
"""

CALIB_FAMILIES = [
    ("{subj} {verb_past} the {obj} {place}.", ),
    ("Yesterday {subj_l} {verb_past} a {adj} {obj} {place}.", ),
    ("Why did {subj_l} {verb_base} the {obj} {time}?", ),
    ("According to the report, {topic} has {trend} {time}.", ),
    ("I think the {adj} {obj} {place} is {opinion}.", ),
]
EVAL_FAMILIES = [
    ("{subj} will {verb_base} the {adj} {obj} {time}.", ),
    ("Do you know if {subj_l} {verb_past} the {obj} {place}?", ),
    ("Experts warn that {topic} could {trend_base} {time}.", ),
    ("The {obj} {place} looked {opinion} after {subj_l} {verb_past} it.", ),
]
WORDS = dict(
    subj=["My sister", "The engineer", "A young boy", "The old fisherman", "Our manager", "The nurse",
          "The pilot", "My neighbour", "The artist", "A tourist", "The mayor", "The chef", "The student",
          "The lawyer", "A stranger", "The mechanic"],
    verb_past=["repaired", "painted", "sold", "borrowed", "found", "moved", "cleaned", "photographed",
               "described", "ignored", "inspected", "delivered"],
    verb_base=["repair", "paint", "sell", "borrow", "find", "move", "clean", "photograph", "describe",
               "inspect", "deliver", "replace"],
    obj=["bicycle", "piano", "boat", "car", "painting", "computer", "fence", "table", "camera", "roof",
         "garden", "letter", "lamp", "violin", "tractor"],
    adj=["old", "broken", "expensive", "tiny", "beautiful", "rusty", "new", "heavy", "strange", "red"],
    place=["in the garage", "near the river", "at the market", "behind the school", "in the city centre",
           "on the farm", "at the harbour", "in the basement", "next to the station", "in the village"],
    time=["last summer", "next week", "before the holidays", "every morning", "in two days",
          "after the meeting", "this evening", "over the weekend"],
    topic=["unemployment", "air pollution", "housing demand", "online shopping", "tourism", "crime",
           "energy consumption", "rainfall", "public debt", "smartphone use"],
    trend=["risen steadily", "fallen sharply", "remained stable", "doubled", "declined slowly"],
    trend_base=["rise steadily", "fall sharply", "remain stable", "double", "decline slowly"],
    opinion=["worth the money", "too expensive", "a bit disappointing", "surprisingly good", "very useful"],
)


def fill(rng: random.Random, family: str) -> str:
    vals = {k: rng.choice(v) for k, v in WORDS.items()}
    vals["subj_l"] = vals["subj"][0].lower() + vals["subj"][1:] if not vals["subj"].startswith("My") else \
        "my" + vals["subj"][2:]
    return family.format(**vals)


def generate(families, n: int, rng: random.Random, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        s = fill(rng, rng.choice(families)[0])
        if s not in taken:
            taken.add(s)
            out.append(s)
    return out


def main() -> None:
    rng = random.Random(0)
    taken: set[str] = set()
    calib = [s for s in HAND_CALIB.splitlines() if s.strip()]
    ev = [s for s in HAND_EVAL.splitlines() if s.strip()]
    taken.update(calib + ev)
    calib += generate(CALIB_FAMILIES, 340, rng, taken)
    ev += generate(EVAL_FAMILIES, 260, rng, taken)
    # longer inputs: join pairs of sentences so sequence lengths vary (pairs stay within each split)
    calib += [f"{calib[i]} {calib[-1 - i]}" for i in range(0, 100, 2)]
    ev += [f"{ev[i]} {ev[-1 - i]}" for i in range(0, 80, 2)]
    assert not set(calib) & set(ev)
    rng.shuffle(calib)
    rng.shuffle(ev)
    root = Path(__file__).resolve().parents[1] / "moh_compile" / "data"
    root.mkdir(exist_ok=True)
    (root / "calib_sentences.txt").write_text("\n".join(calib) + "\n")
    (root / "eval_sentences.txt").write_text("\n".join(ev) + "\n")
    print(f"calib {len(calib)} sentences, eval {len(ev)} sentences -> {root}")


if __name__ == "__main__":
    main()
