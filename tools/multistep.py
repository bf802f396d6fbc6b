"""Multi-step word problems with worked solutions (in the spirit of GSM8K), for the long-answer data. data.py
splits them into training and held-out sets (make_problems(..., family="multistep")).

The design of data.py's short families: every slot of a sentence has several wordings drawn independently of
the question, so a model cannot be sure of a whole sentence before it starts it, while the numbers stay tied
to the question's.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = ["Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Emma", "Max", "Nora", "Omar", "Ivy", "Jack", "Zoe",
         "Paul", "Rosa", "Ali", "Kate", "Hugo", "Lena", "Ravi", "Sara", "Theo", "Yuki", "Pip", "Hazel", "Finn",
         "Greta", "Milo", "Olive", "Basil", "Poppy", "Jasper", "Mabel", "Rufus", "Wren"]


# ---------------------------------------------------------------------------------------------------
# Multi-step word problems (in the spirit of GSM8K): several quantities, 3 to 6 computations.
#
# A fact is written once for both tenses: "[buys|bought]" is "buys" in the present-tense families and
# "bought" in the held-out past-tense family. Every fact and question has at least one such pair, so no
# sentence of the held-out family is ever seen in training.

PHRASINGS = ["statements", "question-first", "notes", "past-tense"]
HELDOUT_PHRASING = "past-tense"
TRAIN_PHRASINGS = [p for p in PHRASINGS if p != HELDOUT_PHRASING]
TENSE = re.compile(r"\[([^|\]]*)\|([^\]]*)\]")


def tense(text: str, past: bool) -> str:
    """A fact in one tense: "[buys|bought]" -> "buys" or "bought"."""
    return TENSE.sub(lambda m: m.group(2 if past else 1), text)


@dataclass
class Step:
    a: int
    op: str
    b: int
    c: int
    what: str        # the result as a noun phrase: "the cost of the pens"
    unit: str        # "dollars", or "" where the noun phrase says it
    why: str = ""    # a clause that names the numbers: "4 pens cost 3 dollars each"


class _Work:
    """The facts, question and solution steps of one problem as a scenario builds them."""

    def __init__(self):
        self.facts, self.steps = [], []

    def step(self, a: int, op: str, b: int, what: str, unit: str = "", why: str = "") -> int:
        c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        assert c >= 0 and (op != "/" or a % b == 0), (a, op, b)
        self.steps.append(Step(a, op, b, c, what, unit, why))
        return c


GOODS = [("notebooks", 2, 7), ("pens", 1, 4), ("mugs", 3, 9), ("kites", 5, 12), ("books", 6, 15),
         ("apples", 1, 3), ("toy cars", 3, 8), ("sandwiches", 3, 7), ("tickets", 4, 12), ("plants", 3, 10)]
SHOPS = ["the market", "a small shop", "the corner store", "the town fair", "a bookshop", "the mall"]
OCCASIONS = ["a picnic", "a birthday party", "the new school year", "a trip", "a class project"]


def _shopping(rng, w: _Work, people) -> tuple[str, str, str]:
    name = people[0]
    goods = rng.sample(GOODS, rng.choice([2, 2, 3]))
    if rng.random() < 0.5:
        w.facts.append(f"{name} [goes|went] to {rng.choice(SHOPS)} to buy things for {rng.choice(OCCASIONS)}.")
    costs = []
    for i, (item, low, high) in enumerate(goods):
        n, price = rng.randint(2, 9), rng.randint(low, high)
        w.facts.append(rng.choice([f"{name} [buys|bought] {n} {item} at {price} dollars each.",
                                   f"The {item} [are|were] {price} dollars each, and {name} [takes|took] {n} of them.",
                                   f"{name} also [picks|picked] {n} {item} that [cost|were] {price} dollars each."]
                                  if i else [f"{name} [buys|bought] {n} {item} at {price} dollars each.",
                                             f"First {name} [buys|bought] {n} {item} for {price} dollars each."]))
        costs.append(w.step(n, "*", price, f"the cost of the {item}", "dollars",
                            f"{n} {item} cost {price} dollars each"))
    total = costs[0]
    for more in costs[1:]:
        total = w.step(total, "+", more, "the total so far", "dollars")
    w.steps[-1].what = "the total cost"
    if len(goods) == 2 and rng.random() < 0.4:
        off = rng.randint(2, min(15, total - 1))
        w.facts.append(f"A coupon [takes|took] {off} dollars off the whole bill.")
        total = w.step(total, "-", off, "the price after the coupon", "dollars", f"the coupon takes off {off} dollars")
    if rng.random() < 0.5:
        return (f"How much [does|did] {name} spend in total?", f"how much {name} spends",
                f"{name} spends {total} dollars")
    bill = next(b for b in (20, 50, 100, 200, 500) if b > total)
    change = w.step(bill, "-", total, "the change", "dollars", f"{name} pays with {bill} dollars")
    w.facts.append(f"{name} [pays|paid] with a {bill} dollar note.")
    return (f"How much change [does|did] {name} get?", f"how much change {name} gets",
            f"{name} gets {change} dollars back")


ACTIVITIES = [  # something done at a rate: its unit and period, what was done before, a goal and its question
    dict(does="[reads|read] {r} pages", verb="read", unit="pages", period="day",
         before="{name} [has|had] already read {d} pages.", goal="The book [has|had] {t} pages.",
         ask="How many pages [are|were] still left to read?", left="the pages still left to read"),
    dict(does="[saves|saved] {r} dollars", verb="save", unit="dollars", period="week",
         before="{name} [has|had] {d} dollars saved already.",
         goal="{name} [wants|wanted] a bike that [costs|cost] {t} dollars.",
         ask="How many more dollars [does|did] {name} need for the bike?", left="the dollars still needed"),
    dict(does="[runs|ran] {r} laps", verb="run", unit="laps", period="day",
         before="{name} [has|had] already run {d} laps.", goal="The coach [asks|asked] for {t} laps in all.",
         ask="How many more laps [does|did] {name} have to run?", left="the laps still to run"),
    dict(does="[bakes|baked] {r} cookies", verb="bake", unit="cookies", period="hour",
         before="{d} cookies [are|were] already baked.", goal="The school fair [needs|needed] {t} cookies.",
         ask="How many more cookies [are|were] needed for the fair?", left="the cookies still needed"),
    dict(does="[plants|planted] {r} trees", verb="plant", unit="trees", period="day",
         before="{d} trees [are|were] already in the ground.", goal="The park [wants|wanted] {t} new trees.",
         ask="How many trees [are|were] still to be planted?", left="the trees still to plant"),
]


def _rates(rng, w: _Work, people) -> tuple[str, str, str]:
    name, act = people[0], rng.choice(ACTIVITIES)
    unit, period = act["unit"], act["period"]
    per = "an hour" if period == "hour" else "a " + period
    done = None
    if rng.random() < 0.4:
        done = rng.randint(5, 40)
        w.facts.append(act["before"].format(name=name, d=done))
    parts = []
    for when in ("first", "next"):
        r, k = rng.randint(3, 25), rng.randint(2, 7)
        does = act["does"].format(r=r)
        w.facts.append(f"{'First' if when == 'first' else 'After that,'} {name} {does} {per} for {k} {period}s.")
        parts.append(w.step(r, "*", k, f"the number of {unit} in the {when} {k} {period}s", "",
                            f"{name} {tense(does, False)} {per} for {k} {period}s"))
    total = w.step(parts[0], "+", parts[1], f"the number of {unit} in both parts")
    if done is not None:
        total = w.step(total, "+", done, f"the number of {unit} so far", "", f"{done} {unit} were done before")
    if rng.random() < 0.35:
        return (f"How many {unit} [does|did] {name} {act['verb']} in all?",
                f"how many {unit} {name} {act['verb']}s in all",
                f"{name} {act['verb']}s {total} {unit} in all")
    goal = total + rng.randint(5, 120)
    w.facts.append(act["goal"].format(t=goal, name=name))
    left = w.step(goal, "-", total, act["left"], "", f"the goal is {goal} {unit}")
    return act["ask"].format(name=name), f"how many {unit} are still missing", f"{left} {unit} are still missing"


CONTAINERS = [("boxes", "box"), ("bags", "bag"), ("baskets", "basket"), ("trays", "tray"), ("jars", "jar")]
SHARED = ["apples", "marbles", "stickers", "cookies", "pencils", "oranges", "crayons", "cupcakes", "shells", "cards"]
RECEIVERS = [("children", "child"), ("friends", "friend"), ("tables", "table"), ("teams", "team"), ("classes", "class")]


def _sharing(rng, w: _Work, people) -> tuple[str, str, str]:
    name, friend = people[0], people[1]
    (boxes, box), obj, (takers, taker) = rng.choice(CONTAINERS), rng.choice(SHARED), rng.choice(RECEIVERS)
    while True:  # work backwards from a whole share, so the division comes out even
        t, share, g, k = rng.randint(2, 8), rng.randint(3, 25), rng.randint(2, 6), rng.randint(2, 9)
        gone = rng.randint(2, 9) if rng.random() < 0.5 else 0
        added = t * share + gone - g * k
        if 2 <= added <= 60:
            break
    w.facts.append(rng.choice([f"{name} [has|had] {g} {boxes} with {k} {obj} in each {box}.",
                               f"There [are|were] {g} {boxes} of {obj}, and each {box} [holds|held] {k}."]))
    count = w.step(g, "*", k, f"the number of {obj} in the {boxes}", obj, f"there are {g} {boxes} of {k}")
    w.facts.append(f"{friend} [brings|brought] {added} more {obj}.")
    count = w.step(count, "+", added, f"the number of {obj} now", obj, f"{friend} adds {added}")
    if gone:
        w.facts.append(f"Then {gone} of the {obj} [are|were] given to a neighbour.")
        count = w.step(count, "-", gone, f"the number of {obj} left", obj, f"{gone} are given away")
    w.facts.append(f"The {obj} [are|were] shared equally among {t} {takers}.")
    each = w.step(count, "/", t, f"the share of each {taker}", obj, f"{count} {obj} are shared by {t} {takers}")
    return (f"How many {obj} [does|did] each {taker} get?", f"how many {obj} each {taker} gets",
            f"each {taker} gets {each} {obj}")


TIMES = {2: "twice", 3: "three times", 4: "four times"}


def _comparison(rng, w: _Work, people) -> tuple[str, str, str]:
    a, b, c, d = people[:4]
    obj = rng.choice(SHARED)
    x, more = rng.randint(5, 40), rng.randint(2, 20)
    w.facts.append(f"{a} [has|had] {x} {obj}.")
    if rng.random() < 0.5 or more >= x:
        w.facts.append(f"{b} [has|had] {more} more {obj} than {a}.")
        y = w.step(x, "+", more, f"the number of {obj} {b} has", "", f"{b} has {more} more than {a}")
    else:
        w.facts.append(f"{b} [has|had] {more} fewer {obj} than {a}.")
        y = w.step(x, "-", more, f"the number of {obj} {b} has", "", f"{b} has {more} fewer than {a}")
    k = rng.choice([2, 3, 4] if y <= 60 else [2])
    w.facts.append(f"{c} [has|had] {TIMES[k]} as many {obj} as {b}.")
    z = w.step(y, "*", k, f"the number of {obj} {c} has", "", f"{c} has {TIMES[k]} as many as {b}")
    if z > x and rng.random() < 0.3:
        return (f"How many more {obj} [does|did] {c} have than {a}?", f"how many more {obj} {c} has than {a}",
                f"{c} has {w.step(z, '-', x, 'the difference', obj)} more {obj} than {a}")
    counts = [x, y, z]
    if z > 4 and rng.random() < 0.4:
        fewer = rng.randint(2, z - 1)
        w.facts.append(f"{d} [has|had] {fewer} fewer {obj} than {c}.")
        counts.append(w.step(z, "-", fewer, f"the number of {obj} {d} has", "", f"{d} has {fewer} fewer than {c}"))
    total = w.step(counts[0], "+", counts[1], f"what {a} and {b} have together", obj)
    for n, who in zip(counts[2:], [c, d]):
        total = w.step(total, "+", n, f"the total with {who}", obj)
    group = "the four friends" if len(counts) == 4 else "the three friends"
    return (f"How many {obj} [do|did] {group} have altogether?", f"how many {obj} {group} have altogether",
            f"{group} have {total} {obj} altogether")


DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
CHORES = ["for washing a car", "for walking a dog", "for helping in the garden", "at a lemonade stand",
          "for selling old toys"]
TREATS = ["a film ticket", "a new ball", "lunch", "a book", "a gift for a friend", "paint"]


def _week(rng, w: _Work, people) -> tuple[str, str, str]:
    name = people[0]
    money = rng.randint(10, 60)
    w.facts.append(rng.choice([f"On Sunday {name} [has|had] {money} dollars.",
                               f"{name} [starts|started] the week with {money} dollars."]))
    for day in DAYS[:rng.randint(2, 4)]:
        kind = rng.choice(["earn", "spend", "buy"])
        if kind == "earn" or money < 12:
            e = rng.randint(5, 30)
            w.facts.append(f"On {day} {name} [earns|earned] {e} dollars {rng.choice(CHORES)}.")
            money = w.step(money, "+", e, f"{name}'s money after {day}", "dollars",
                           f"{name} earns {e} dollars on {day}")
        elif kind == "spend":
            s = rng.randint(2, money - 2)
            w.facts.append(f"On {day} {name} [spends|spent] {s} dollars on {rng.choice(TREATS)}.")
            money = w.step(money, "-", s, f"the money left after {day}", "dollars",
                           f"{name} spends {s} dollars on {day}")
        else:  # something affordable: at least two at the lowest price
            item, low, high = rng.choice([g for g in GOODS if 2 * g[1] <= money])
            n = rng.randint(2, min(4, money // low))
            price = rng.randint(low, min(high, money // n))
            w.facts.append(f"On {day} {name} [buys|bought] {n} {item} for {price} dollars each.")
            cost = w.step(n, "*", price, f"the cost of the {item}", "dollars", f"{n} {item} cost {price} dollars each")
            money = w.step(money, "-", cost, f"the money left after {day}", "dollars")
        if len(w.steps) >= 5:
            break
    if len(w.steps) < 3:
        e = rng.randint(5, 30)
        w.facts.append(f"On Saturday {name} [gets|got] {e} dollars as a gift.")
        money = w.step(money, "+", e, "the money after the gift", "dollars", f"the gift is {e} dollars")
    return (f"How much money [does|did] {name} have at the end of the week?", f"how much money {name} has at the end",
            f"{name} has {money} dollars at the end of the week")


CROPS = [("carrots", "carrot"), ("tomatoes", "tomato"), ("beans", "bean"), ("onions", "onion"),
         ("lettuces", "lettuce"), ("sunflowers", "sunflower"), ("peppers", "pepper"), ("potatoes", "potato")]


def _garden(rng, w: _Work, people) -> tuple[str, str, str]:
    name, friend = people[0], people[1]
    first, second = rng.sample(CROPS, 2)
    total = None
    for who, (crop, one) in ((name, first), (friend, second)):
        rows, per = rng.randint(2, 9), rng.randint(3, 12)
        w.facts.append(rng.choice([f"{who} [plants|planted] {rows} rows of {crop} with {per} plants in each row.",
                                   f"In the garden {who} [sets|set] out {rows} rows of {crop}, {per} to a row."]))
        n = w.step(rows, "*", per, f"the number of {one} plants", "", f"{who} plants {rows} rows of {per}")
        total = n if total is None else w.step(total, "+", n, "the number of all the plants")
    if rng.random() < 0.7:
        lost = rng.randint(2, min(30, total - 1))
        w.facts.append(rng.choice([f"Later {lost} of the plants [dry|dried] up in the heat.",
                                   f"Rabbits [eat|ate] {lost} of the plants."]))
        total = w.step(total, "-", lost, "the number of plants left", "", f"{lost} plants are lost")
        return ("How many plants [are|were] left in the garden?", "how many plants are left",
                f"{total} plants are left")
    return (f"How many plants [do|did] {name} and {friend} have in all?", f"how many plants {name} and {friend} have",
            f"{name} and {friend} have {total} plants")


SCENARIOS = [_shopping, _rates, _sharing, _comparison, _week, _garden]

# Solution sentences: one computation each, their wording drawn independently of the question. A sentence
# may open with a connective ("Next, ..."), unless it starts with the reason (often a name).
STEP_SAY = ["{what} is {a} {op} {b} = {c}{unit}.", "{Why}, so {what} is {a} {op} {b} = {c}{unit}.",
            "to find {what}, we compute {a} {op} {b} = {c}.", "we need {what}: {a} {op} {b} = {c}{unit}.",
            "{a} {op} {b} = {c}, so {what} is {c}{unit}.", "since {why}, {what} comes to {a} {op} {b} = {c}{unit}.",
            "we work out {what}. {Why}, which gives {a} {op} {b} = {c}{unit}.", "{what}: {a} {op} {b} = {c}{unit}."]
CONNECTIVES = {"first": ["First, ", "", ""], "middle": ["Next, ", "Then ", "After that, ", "Now ", "", ""],
               "last": ["Finally, ", "Last, ", "", ""]}
OPENERS = ["", "Let's solve it step by step.", "We work through it one step at a time.", "Let's think.",
           "Start with what we know.", "Let's break the problem into small steps.", "We take the facts one by one."]
RESTATE = ["We need to find {goal}.", "The question asks {goal}.", "We want to know {goal}.", "Let's find out {goal}."]
CONCLUDE = ["So {end}.", "That means {end}.", "In the end, {end}.", "So, in the end, {end}."]
PLAN = ["The plan: find {steps}.", "We will find {steps}.", "There are {n} things to work out: {steps}."]
MIN_WORDS = 66  # about 80 tokens of the data's tokenizer (1.25 tokens a word)
NOTES = ["Facts:", "Here is what we know.", "Read the notes below.", "Notes:"]


def _say_step(rng, step: Step, place: str) -> str:
    choices = [t for t in STEP_SAY if step.why or "{why}" not in t.lower()]
    template = rng.choice(choices)
    unit = f" {step.unit}" if step.unit else ""
    text = template.format(what=step.what, Why=step.why[:1].upper() + step.why[1:], why=step.why, a=step.a,
                           op=step.op, b=step.b, c=step.c, unit=unit)
    connective = "" if template.startswith("{Why}") else rng.choice(CONNECTIVES[place])
    return connective + text if connective else text[0].upper() + text[1:]


def multistep(rng: random.Random, phrasing: str) -> tuple[str, str, int]:
    """A word problem in the phrasing family and its worked solution (3 to 6 steps): (question, solution, answer)."""
    while True:
        work, people = _Work(), rng.sample(NAMES, 4)
        ask, goal, end = rng.choice(SCENARIOS)(rng, work, people)
        if 3 <= len(work.steps) <= 6:
            break
    past = phrasing == HELDOUT_PHRASING
    facts, ask = [tense(f, past) for f in work.facts], tense(ask, past)
    if phrasing == "question-first":
        question = " ".join([ask] + facts)
    elif phrasing == "notes":
        question = "\n".join([rng.choice(NOTES)] + ["- " + f for f in facts] + [ask])
    else:
        question = " ".join(facts + [ask])
    n = len(work.steps)
    steps = [_say_step(rng, step, "first" if i == 0 else "last" if i == n - 1 else "middle")
             for i, step in enumerate(work.steps)]
    whats = [step.what for step in work.steps[:4]]
    extra = {"opener": rng.choice(OPENERS), "restate": rng.choice(RESTATE).format(goal=goal),
             "plan": rng.choice(PLAN).format(n=len(whats), steps=", then ".join(whats[:-1]) + " and last " + whats[-1]),
             "conclude": rng.choice(CONCLUDE).format(end=end)}
    chances = {"opener": 0.9, "restate": 0.6, "plan": 0.3, "conclude": 0.7}
    used = {k for k, chance in chances.items() if rng.random() < chance}
    for k in ("restate", "conclude", "plan", "opener"):  # a short solution gets the sentences it lacks: 80+ tokens
        if sum(len(t.split()) for t in steps + [extra[k] for k in used]) < MIN_WORDS:
            used.add(k)
    lines = [extra[k] for k in ("opener", "restate", "plan") if k in used] + steps
    lines += [extra["conclude"]] * ("conclude" in used) + [f"The answer is {work.steps[-1].c}."]
    return question, "\n".join(line for line in lines if line), work.steps[-1].c
