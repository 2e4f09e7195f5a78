"""Sample data for instruction tuning: query rewriting.

A user's chatty question becomes a short search query in one fixed format, "search: <keywords>"
(lower case, no filler words). The format is new to an instruction model and the rewrite is
regular, so SmolLM2-135M-Instruct picks both up in about 30 LoRA steps. Deterministic, pure Python.
"""

from __future__ import annotations

import random

# (what the user wants to do, the search query for it)
TASKS = [
    ("cook rice without a rice cooker", "cook rice without rice cooker"),
    ("get red wine out of a white carpet", "remove red wine stain white carpet"),
    ("make my phone battery last longer", "extend phone battery life"),
    ("fix a squeaky door hinge", "fix squeaky door hinge"),
    ("keep basil alive on a windowsill", "keep basil alive windowsill"),
    ("learn to touch type quickly", "learn touch typing fast"),
    ("unclog a bathroom sink without chemicals", "unclog bathroom sink without chemicals"),
    ("stop my glasses from fogging up with a mask", "stop glasses fogging mask"),
    ("train a puppy to stop biting", "train puppy stop biting"),
    ("get rid of fruit flies in the kitchen", "get rid of fruit flies kitchen"),
    ("bake bread without yeast", "bake bread without yeast"),
    ("speed up an old laptop", "speed up old laptop"),
    ("fall asleep faster at night", "fall asleep faster"),
    ("clean a cast iron pan", "clean cast iron pan"),
    ("change a flat bike tire", "change flat bike tire"),
    ("write a cover letter for a first job", "cover letter first job"),
    ("keep cut flowers fresh longer", "keep cut flowers fresh"),
    ("remove a stripped screw", "remove stripped screw"),
    ("save money on groceries", "save money groceries"),
    ("start running as a beginner", "beginner running plan"),
    ("make cold brew coffee at home", "cold brew coffee at home"),
    ("find out why my wifi keeps dropping", "wifi keeps disconnecting fix"),
    ("grow tomatoes on a balcony", "grow tomatoes balcony"),
    ("get better at public speaking", "improve public speaking"),
    ("tie a tie with a windsor knot", "tie windsor knot"),
    ("boil an egg so the yolk stays soft", "soft boiled egg time"),
    ("back up photos from my phone", "back up phone photos"),
    ("stop a dripping kitchen faucet", "fix dripping kitchen faucet"),
    ("remove rust from garden tools", "remove rust garden tools"),
    ("make a budget spreadsheet", "budget spreadsheet template"),
    ("learn the basics of chess", "chess basics beginners"),
    ("calm down before an exam", "exam anxiety tips"),
    ("paint a room without streaks", "paint wall without streaks"),
    ("freeze fresh herbs", "freeze fresh herbs"),
    ("pick a good watermelon", "pick ripe watermelon"),
    ("clean white sneakers", "clean white sneakers"),
    ("set up a home compost bin", "home compost bin setup"),
    ("stop my cat from scratching the sofa", "stop cat scratching sofa"),
    ("reduce echo in a small room", "reduce echo small room"),
    ("make pancakes without eggs", "eggless pancakes recipe"),
    ("get candle wax off a tablecloth", "remove candle wax tablecloth"),
    ("choose a good password", "strong password tips"),
    ("keep a sourdough starter alive", "sourdough starter maintenance"),
    ("jump start a car battery", "jump start car battery"),
    ("learn spanish on my commute", "learn spanish commute"),
    ("get rid of hiccups", "stop hiccups"),
    ("iron a shirt without an iron", "iron shirt without iron"),
    ("sharpen a kitchen knife", "sharpen kitchen knife"),
    ("store avocados so they last", "store avocados longer"),
    ("hang a picture without nails", "hang picture without nails"),
    ("make my houseplants grow faster", "houseplants grow faster"),
    ("defrost a freezer quickly", "defrost freezer quickly"),
    ("get over jet lag", "beat jet lag"),
    ("remove a splinter", "remove splinter"),
    ("make a resume stand out", "resume stand out tips"),
    ("keep my dog cool in summer", "keep dog cool summer"),
    ("cook salmon in the oven", "oven baked salmon"),
    ("clean a mouldy shower curtain", "clean mold shower curtain"),
    ("plan a road trip on a budget", "budget road trip planning"),
    ("get chewing gum out of hair", "remove gum from hair"),
]

ASKING = [
    "hey, so I was wondering how to {task}? thanks!",
    "Hi! Quick question: what's the best way to {task}? I've tried a few things and nothing worked.",
    "ok this is probably a dumb question but how do you {task}",
    "My friend told me it's easy to {task}, but I honestly have no idea where to start. Any tips?",
    "Good morning! Could you please tell me how I can {task}? Much appreciated :)",
]


def rows() -> list[dict[str, str]]:
    """300 rows {"instruction", "response"}: every task asked in each of the five ways, shuffled."""
    data = [
        {"instruction": asking.format(task=task), "response": f"search: {query}"}
        for task, query in TASKS
        for asking in ASKING
    ]
    random.Random(0).shuffle(data)
    return data
