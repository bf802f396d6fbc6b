"""Stories and descriptions of several paragraphs, for the long-answer data. data.py asks for them in chat
(story_samples, story_prompts) and as plain text (long_texts).

As in multistep.py, every slot of a sentence has several wordings drawn independently of the prompt, while the
content stays tied to it: the names, the place, the season and the event of the story.
"""
from __future__ import annotations

from dataclasses import dataclass

from multistep import NAMES, tense


# ---------------------------------------------------------------------------------------------------
# Stories of several paragraphs: two or three characters in a place, an event, attempts, a turn and its
# resolution, with dialogue. Sentences name the characters, never a pronoun, so names stay consistent.

ANIMALS = ["fox", "rabbit", "bear", "owl", "mouse", "duck", "hedgehog", "badger", "goat", "cat", "dog", "turtle",
           "squirrel", "crow"]
PEOPLE = ["girl", "boy", "baker", "fisherman", "farmer", "teacher", "painter", "sailor", "shepherd", "tailor",
          "old woman", "old man"]
TRAITS = {  # a trait and what it makes a character do
    "brave": ["{n} was never afraid of the dark.", "{n} always went first when the path was steep."],
    "shy": ["{n} spoke so softly that few ever heard.", "{n} liked to listen more than to talk."],
    "clever": ["{n} could fix almost anything with a bit of string.", "{n} always had a new idea."],
    "curious": ["{n} wanted to know what lay behind every hill.", "{n} asked questions from morning till night."],
    "kind": ["{n} shared everything, even the last apple.", "{n} always helped the smallest ones first."],
    "grumpy": ["{n} grumbled every morning but had a warm heart.", "{n} did not like noise or surprises."],
    "cheerful": ["{n} hummed a tune while working.", "{n} laughed at the smallest things."],
    "careful": ["{n} checked everything twice.", "{n} never left a job half done."],
    "stubborn": ["Once {n} decided something, nothing could change it.", "{n} never gave up easily."],
    "patient": ["{n} could wait for hours without a word of complaint.", "{n} liked slow work done well."],
}
PLACES = {  # how a prompt names a place: its preposition, how the story refers back to it, a landmark, its looks
    "a small village": ("in", "the village", "the old well", [
        "The houses [have|had] red roofs and blue doors.", "A narrow road [winds|wound] between the gardens.",
        "Every morning the smell of fresh bread [drifts|drifted] through the streets.",
        "Old people [sit|sat] on benches and [talk|talked]."]),
    "a quiet forest": ("in", "the forest", "the tall oak", [
        "The trees [are|were] so tall that their tops [touch|touched] the clouds.",
        "Moss [covers|covered] the stones like a green blanket.",
        "Sunlight [falls|fell] between the leaves in thin golden lines.",
        "A small stream [runs|ran] between the roots."]),
    "a harbour town": ("in", "the town", "the lighthouse", [
        "Fishing boats [rock|rocked] gently in the harbour.", "Gulls [cry|cried] above the rooftops all day.",
        "The streets [smell|smelled] of salt and tar.",
        "At night the lighthouse [sweeps|swept] its light across the water."]),
    "a green valley": ("in", "the valley", "the stone bridge", [
        "A river [winds|wound] through the middle of the valley.", "Sheep [graze|grazed] on the gentle hills.",
        "Wild flowers [grow|grew] along every path.",
        "The mountains [stand|stood] around the valley like old guards."]),
    "a sunny farm": ("on", "the farm", "the red barn", [
        "Fields of wheat [move|moved] like waves in the wind.", "Chickens [run|ran] about the yard.",
        "An old tractor [stands|stood] beside the fence.", "The farmhouse [has|had] a porch with two rocking chairs."]),
    "a snowy mountain": ("on", "the mountain", "the wooden hut", [
        "Pine trees [stand|stood] dark against the white slopes.", "The air [is|was] cold and clear.",
        "A narrow path [climbs|climbed] between the rocks.", "From the top one [can|could] see three valleys."]),
    "a small island": ("on", "the island", "the big rock", [
        "Waves [break|broke] softly on the sandy shore.", "Palm trees [lean|leaned] over the water.",
        "Crabs [hide|hid] under the stones at the edge of the sea.",
        "One [can|could] walk around the whole island in an hour."]),
    "a busy market town": ("in", "the town", "the market square", [
        "Carts [rattle|rattled] over the cobblestones.", "Every window [has|had] a box of flowers.",
        "The church bell [rings|rang] every hour.", "Merchants [call|called] out their prices in the square."]),
}
SEASONS = {
    "spring": ["It [is|was] spring, and the first buds [are|were] opening.",
               "Birds [are|were] building nests in every hedge.",
               "The days [are|were] getting longer and warmer."],
    "summer": ["It [is|was] the middle of summer, hot and bright.", "Bees [buzz|buzzed] over the flowers.",
               "The evenings [are|were] long and golden."],
    "autumn": ["It [is|was] autumn, and the leaves [are|were] turning red and gold.",
               "The wind [blows|blew] cool in the mornings.",
               "Apples [are|were] ripe on the trees."],
    "winter": ["It [is|was] winter, and frost [covers|covered] the windows.", "Smoke [rises|rose] from every chimney.",
               "The nights [are|were] long and very cold."],
}
# An event: what goes wrong, a worried line, attempts that fail, turns (an idea and the two sentences that
# carry it out, so the resolution follows the idea), endings, and where and when it can happen.
EVENTS = [
    dict(brief="a broken bridge", seasons=["spring", "autumn"], places=["a small village", "a quiet forest",
                                                                        "a green valley", "a sunny farm"],
         setup=["One night a storm broke the little bridge over the stream.",
                "After three days of rain, the river carried the old bridge away."],
         worry=["How will we get to the other side now?", "Without the bridge, nobody can reach the market."],
         tries=["{h} tried to jump from stone to stone, but the stones were too slippery.",
                "{h} waited for the water to go down, but it only rose higher.",
                "{h} looked for a shallow place to wade across, but the water was too fast."],
         turns=[("We could tie the fallen logs together and make a new bridge.",
                 ["they dragged the logs to the stream together and tied them tight with rope.",
                  "By sunset a new bridge stood across the water, stronger than the old one."]),
                ("The old raft is still behind {landmark}. We could pull it across with a rope.",
                 ["they carried the raft to the water and stretched a long rope from bank to bank.",
                  "Pulling hand over hand, they crossed the stream one by one."])],
         end=["That evening everyone reached the market at last.",
              "{h} often sat by the water and remembered the storm."]),
    dict(brief="a lost key",
         setup=["One morning {h} could not find the key to the garden gate.",
                "{h} had lost the old iron key that opened the garden gate."],
         worry=["I have looked everywhere, and the key is gone!", "Without that key, how will we get into the garden?"],
         tries=["{h} searched under every leaf along the path, but found only stones.",
                "{h} emptied every pocket twice, but the key was not there.",
                "{h} asked the neighbours, but nobody had seen it."],
         turns=[("I saw a magpie near {landmark} with something shiny in its beak.",
                 ["they climbed up to the magpie's nest and found the key among buttons and spoons.",
                  "{f} left a shiny button in the nest in exchange."]),
                ("Let us walk back the way you came this morning and look again, slowly.",
                 ["they walked the path again, looking under every stone.",
                  "Near {landmark}, something glinted in the grass: the key!"])],
         end=["{h} tied the key to a bright red ribbon so it would never get lost again.",
              "That evening the gate opened with a happy creak."]),
    dict(brief="a dry well", seasons=["summer"], places=["a small village", "a green valley", "a sunny farm",
                                                         "a busy market town"],
         setup=["That year no rain fell for weeks, and the well near {landmark} ran dry.",
                "One hot morning {h} lowered the bucket into the well, and it came up empty."],
         worry=["The plants will die without water.", "What will we drink if the well stays dry?"],
         tries=["{h} carried water from the river in a small bucket, but it took all day for one row of plants.",
                "{h} waited for rain, but the sky stayed clear and blue.",
                "{h} dug a little deeper in the well, but found only dry sand."],
         turns=[("There is a spring up on the hill. We could dig a channel to bring the water down.",
                 ["they found the spring bubbling between the rocks and dug a long channel down the hill.",
                  "Soon clear water ran all the way to the gardens."]),
                ("My grandmother once told me about a hidden spring behind the rocks.",
                 ["they searched behind the rocks until they heard water trickling.",
                  "With a few stones and a hollow log, they led the water to the well."])],
         end=["The plants grew green again, and everyone had enough to drink.",
              "Every summer after that, they kept the spring clean together."]),
    dict(brief="the festival bread",
         setup=["The big festival was only two days away when the old oven cracked.",
                "On the eve of the festival, the oven that baked all the bread broke down."],
         worry=["There will be no bread for the festival!",
                "Everyone is coming tomorrow, and we have nothing to bake with."],
         tries=["{h} tried to mend the crack with clay, but it broke open again in the heat.",
                "{h} tried to bake on the small kitchen stove, but it held only two loaves at a time.",
                "{h} asked at the next house to borrow an oven, but theirs was busy too."],
         turns=[("We can build an oven of stones by {landmark}, the way people did long ago.",
                 ["they worked through the night, stacking stones and mud until the new oven stood.",
                  "The stone oven glowed red, and loaf after loaf came out golden."]),
                ("If we bake all night and take turns, the small stove might be enough.",
                 ["they took turns all night, two loaves at a time.",
                  "By morning the baskets were full of warm bread."])],
         end=["At the festival everyone said it was the best bread they had ever tasted.",
              "The festival was the merriest anyone could remember."]),
    dict(brief="a lost duckling", seasons=["spring", "summer"],
         setup=["At dusk a little duckling went missing from the pond.",
                "One evening the smallest duckling did not come home."],
         worry=["It is getting dark, and the little one is all alone.",
                "We must find the duckling before night comes."],
         tries=["{h} called for the duckling along the shore, but only the wind answered.",
                "{h} looked among the reeds, but it was too dark to see far.",
                "{h} searched behind {landmark}, but found only old feathers."],
         turns=[("Listen. If we are very quiet, we might hear it peeping.",
                 ["they stood still and held their breath.",
                  "A faint peep came from under a bush, and there was the duckling, cold but safe."]),
                ("Let us follow the tiny footprints in the mud.",
                 ["they followed the tracks to a hollow log.", "Inside it, the duckling was fast asleep."])],
         end=["{h} carried the duckling home, and its mother quacked with joy.",
              "After that night the ducklings always stayed close to the pond."]),
    dict(brief="a kite in a tree", seasons=["spring", "summer", "autumn"],
         setup=["A strong wind tore the kite away from {h} and tossed it into the tallest tree.",
                "The new kite flew too high and got stuck in the branches of a tall tree."],
         worry=["My kite is stuck so high that no one can reach it.", "How will we ever get it down from there?"],
         tries=["{h} jumped as high as possible, but the branches were far too high.",
                "{h} threw a ball at the kite, but the ball got stuck too.",
                "{h} shook the trunk of the tree, but only leaves came down."],
         turns=[("Let us ask the owl who lives at the top of that tree.",
                 ["the owl listened, then flew up and tugged at the string with its beak.",
                  "The kite slid out of the branches and floated down."]),
                ("We could build a ladder from the old planks near {landmark}.",
                 ["they nailed the planks together and leaned the ladder against the trunk.",
                  "Step by step {h} climbed, and at last the kite came free."])],
         end=["That afternoon the kite flew again, higher than ever.",
              "{h} and {f} flew the kite together until the sun went down."]),
    dict(brief="a torn fishing net", places=["a harbour town", "a small island"],
         setup=["On the day before the big catch, {h} found a long tear in the fishing net.",
                "A sharp rock ripped the fishing net from one end to the other."],
         worry=["The fish will swim right through that hole.", "The boats leave at dawn, and the net is ruined!"],
         tries=["{h} tried to tie the ends together, but the knots slipped apart.",
                "{h} looked for a new net at the market, but none were left.",
                "{h} patched the hole with old cloth, but the water tore it off."],
         turns=[("My mother taught me how to mend nets. We need strong thread and patience.",
                 ["they found strong thread and mended the net knot by knot.", "By midnight the net was whole again."]),
                ("If we all sit around the net, each of us can mend a piece.",
                 ["they sat in a circle, each with a needle and a piece of the net.",
                  "Before the stars came out, the hole was gone."])],
         end=["The next day the boats came home full of fish.",
              "Whenever a net tore after that, everyone knew how to mend it."]),
]
CONNECT = {  # connectives by the story's stage
    "then": ["After a while, ", "Later that day, ", "Then ", "Soon ", "Before long, "],
    "turn": ["Just then, ", "Suddenly ", "At that moment, ", "Finally, ", "After a long time, "],
    "so": ["Because of that, ", "So ", "And so ", "With that, ", "Without wasting a moment, "],
    "later": ["From that day on, ", "Ever since, ", "After that, ", "Years later, "],
}
SIGHS = ["This is harder than I thought.", "I do not know what else to try.", "Maybe we should rest and think.",
         "We cannot give up now.", "There must be another way.", "What are we going to do?"]
THANKS = ["Thank you for helping me.", "I could never have done it alone.", "We make a good team.",
          "Next time, we will know what to do.", "What a day this has been!"]
ASIDES = ["The wind moved the leaves gently.", "{f} hummed a song to keep their spirits up.", "Nobody else was around.",
          "A small bird watched from a branch.", "{h} stopped to think for a moment.",
          "The sky turned grey, then bright again.",
          "{f} wiped a drop of sweat away.", "Somewhere far away, a bell was ringing.", "{h} took a deep breath."]
CLOSINGS = ["{all} were the best of friends {ref}.", "{all} never forgot that {season}.",
            "whenever {h} passed {landmark}, {h} smiled and remembered.",
            "people {ref} still told the story of {h} and {f}."]
DAY_OPENERS = ["One {season} morning, ", "One day, ", "Early one morning, ", "On a {season} afternoon, ", ""]
SPEAK = {"?": ['"{line}" asked {who}.', '{who} asked, "{line}"'],
         "!": ['"{line}" cried {who}.', '{who} cried, "{line}"'],
         ".": ['{who} said, "{line}"', '"{cut}," said {who}.', '"{cut}," {who} replied.', '{who} said quietly, "{line}"']}


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _then(connective: str, sentence: str, names) -> str:
    """A sentence after a connective: its first word in lower case, unless it is a name."""
    if not connective or sentence.split()[0].split("'")[0] in names:
        return connective + sentence
    return connective + sentence[0].lower() + sentence[1:]


def _speak(rng, who: str, line: str) -> str:
    """A line of dialogue in quotes, its speaker before or after it."""
    return rng.choice(SPEAK[line[-1]]).format(who=who, line=line, cut=line[:-1])


@dataclass
class Cast:
    """Who a story is about and where: what a prompt may name, and what the story then contains."""
    names: list[str]
    kinds: list[str]
    traits: list[str]
    place: str
    season: str
    event: dict

    def who(self, i: int, named: str = "named") -> str:
        return f"{_a(self.traits[i] + ' ' + self.kinds[i])} {named} {self.names[i]}"


def new_cast(rng) -> Cast:
    k = rng.choice([2, 3])
    kinds = rng.sample(ANIMALS, k) if rng.random() < 0.6 else rng.sample(PEOPLE, k)
    event = rng.choice(EVENTS)  # the event first: it decides where and when the story can happen
    return Cast(rng.sample(NAMES, k), kinds, rng.sample(list(TRAITS), k), rng.choice(event.get("places", list(PLACES))),
                rng.choice(event.get("seasons", list(SEASONS))), event)


def story(rng, cast: Cast) -> str:
    """Four or five paragraphs: the cast and the place, the event, two attempts, the turn, the resolution."""
    names, (h, f), ev = cast.names, cast.names[:2], cast.event
    prep, ref, landmark, looks = PLACES[cast.place]
    idea, fix = rng.choice(ev["turns"])
    fill = lambda text: text.format(h=h, f=f, landmark=landmark, season=cast.season)
    pick = lambda key: fill(rng.choice(ev[key]))
    setup = pick("setup")  # a setup that names its own time ("At dusk ...") takes no day opener
    trait = lambda i: rng.choice(TRAITS[cast.traits[i]]).format(n=names[i])
    helper = names[2] if len(names) > 2 else f
    intro = rng.choice([f"Once upon a time, {prep} {cast.place}, there lived {cast.who(0)}.",
                        f"{h} was {_a(cast.traits[0] + ' ' + cast.kinds[0])} who lived {prep} {cast.place}.",
                        f"{prep.title()} {cast.place} lived {cast.who(0, 'called')}."])
    friend = rng.choice([f"{h}'s best friend was {f}, {_a(cast.traits[1] + ' ' + cast.kinds[1])}.",
                         f"Not far from {landmark} lived {cast.who(1)}, and the two were always together."])
    tries = rng.sample(ev["tries"], 2)
    paragraphs = [
        [intro] + [tense(x, True) for x in rng.sample(SEASONS[cast.season], 1) + rng.sample(looks, 2)]
        + [trait(0), friend, trait(1)],
        [_then(rng.choice(DAY_OPENERS).format(season=cast.season) if setup.split()[0] in names + ["The", "A"] else "",
               setup, names),
         _speak(rng, rng.choice([h, f]), pick("worry"))],
        [_then("At first ", fill(tries[0]), names), _then(rng.choice(CONNECT["then"]), fill(tries[1]), names),
         _speak(rng, h, rng.choice(SIGHS))]
        + ([f"Meanwhile, {cast.who(2)} was watching from {landmark}.", trait(2)] if len(names) > 2 else []),
        [rng.choice(CONNECT["turn"]) + f"{helper} had an idea.", _speak(rng, helper, fill(idea)),
         _then(rng.choice(CONNECT["so"]), fill(fix[0]), names), fill(fix[1])],
        [pick("end"), _speak(rng, h, rng.choice(THANKS)),
         _then(rng.choice(CONNECT["later"]), rng.choice(CLOSINGS).format(
             all=" and ".join(names), ref=f"{prep} {ref}", season=cast.season, h=h, f=f, landmark=landmark), names)],
    ]
    for _ in range(rng.randint(0, 3)):  # a few free sentences in the middle paragraphs
        rng.choice(paragraphs[1:4]).insert(rng.randint(1, 2), fill(rng.choice(ASIDES)))
    if rng.random() < 0.3:
        paragraphs[3] += paragraphs.pop()
    return "\n\n".join(" ".join(p) for p in paragraphs)


# ---------------------------------------------------------------------------------------------------
# Descriptions of several paragraphs, in the present tense: a market day, a place in a season, a job.

JOBS = {  # a day's work, in order
    "baker": ["gets up long before the sun", "mixes flour, water and yeast into a big soft dough",
              "shapes the loaves and slides them into the hot oven", "sells warm rolls to the first customers",
              "cleans the trays and plans the cakes for tomorrow"],
    "fisherman": ["walks to the harbour while it is still dark", "checks the nets and the engine of the boat",
                  "sails out past the lighthouse", "pulls in the heavy nets full of fish",
                  "sells the catch at the market and mends the nets"],
    "farmer": ["feeds the animals at sunrise", "milks the cows and collects the eggs",
               "drives the tractor over the fields",
               "mends a fence by the road", "checks the barn one last time before bed"],
    "teacher": ["arrives at school before the children", "writes the day's lesson on the board",
                "helps the children read and count", "plays games with them in the yard",
                "marks the homework in the quiet classroom"],
    "postman": ["sorts the letters at the post office", "packs the heavy bag", "cycles from house to house",
                "stops to chat with the old people on the street", "brings the last parcels back to the office"],
    "gardener": ["opens the gate of the park early", "waters the roses and the young trees",
                 "pulls weeds from the flower beds", "cuts the grass along the paths", "locks the tool shed at dusk"],
}
MARKET_PLACES = ["a small village", "a harbour town", "a busy market town"]
MARKET = ["Baskets of apples, pears and plums stand in long rows.",
          "A man sells honey in small glass jars.", "The cheese seller cuts thin slices for people to taste.",
          "Children run between the stalls.", "The flower stall is full of roses and tulips.",
          "Somebody plays the fiddle near the fountain.", "The smell of fresh bread and roasted nuts fills the air.",
          "People bargain and laugh.", "A dog waits patiently for a scrap from the butcher.",
          "An old woman sells warm socks she knitted herself.", "Farmers bring eggs, milk and cheese from the hills."]
DOINGS = {
    "spring": ["Farmers sow seeds in the fields.", "Children look for the first flowers.", "Lambs play in the meadows.",
               "People open their windows wide.", "Gardeners dig and plant all day."],
    "summer": ["Children swim in the river.", "People eat their dinner outside.", "The fields turn golden.",
               "Dogs sleep in the shade.", "Ice cream sellers are busy all day."],
    "autumn": ["People pick apples and make jam.", "Leaves cover every path.", "Geese fly south in long lines.",
               "Farmers bring in the last of the harvest.", "Children collect chestnuts in their pockets."],
    "winter": ["Children build snowmen.", "People drink hot soup by the fire.", "The pond freezes over.",
               "Everyone wears thick coats and scarves.", "Children slide down the hills on sledges."],
}
SOUNDS = ["Somewhere children are laughing.", "A dog barks in the distance.",
          "The wind whistles softly round the corners.",
          "A door bangs shut, and somebody calls a name.", "Church bells ring across the roofs.",
          "Birds chatter on the wires."]
EVENINGS = ["Families sit down to supper.", "The first stars appear above the roofs.",
            "A cat stretches on a warm windowsill.",
            "Windows glow yellow one by one.", "The streets grow quiet.", "Somewhere a radio plays an old song."]
TIMES_OF_DAY = {
    "morning": ["In the morning", "Early in the day", "At first light", "When the sun comes up"],
    "noon": ["By noon", "At midday", "Later", "Around lunchtime"],
    "evening": ["In the evening", "When the sun goes down", "At dusk", "Later, as it gets dark"],
}
FEELINGS = ["It is a long day, but a good one.", "Everyone is tired but happy.", "Tomorrow it will all begin again.",
            "It is the best time of the week for many people.", "Nobody who has seen it forgets it."]


def _at(rng, when: str, sentence: str) -> str:
    return rng.choice(TIMES_OF_DAY[when]) + ", " + sentence[0].lower() + sentence[1:]


def description(rng, topic: str, place: str, season: str, job: str, name: str) -> str:
    """Four paragraphs: an introduction, then the morning, the middle of the day and the evening. A person
    (name, job) walks through it and keeps the same name and work throughout."""
    prep, ref, landmark, looks = PLACES[place]
    looks, weather = [tense(x, False) for x in rng.sample(looks, 3)], [tense(x, False) for x in SEASONS[season]]
    doings, work = rng.sample(DOINGS[season], 4), JOBS[job]
    sounds, evenings = rng.sample(SOUNDS, 2), rng.sample(EVENINGS, 2)
    if topic == "job":
        paragraphs = [[rng.choice([f"A day in the life of {_a(job)} starts early.",
                                   f"Being {_a(job)} is hard work, but it is rewarding."]),
                       f"{name} is the {job} {prep} {ref}.", weather[0]] + looks[:2],
                      [_at(rng, "morning", f"{name} {work[0]}."), f"Then {name} {work[1]}.", doings[0], sounds[0]],
                      [_at(rng, "noon",
                           f"{name} {work[2]}."), f"After that {name} {work[3]}.", weather[1], looks[2], doings[1]],
                      [_at(rng, "evening", f"{name} {work[4]}."), evenings[0], evenings[1], rng.choice(FEELINGS)]]
    elif topic == "market":
        stalls = rng.sample(MARKET, 6)
        paragraphs = [[f"Market day {prep} {ref} is the busiest day of the week.", weather[0]] + looks[:2],
                      [_at(rng, "morning", "the sellers set up their stalls.")] + stalls[:2]
                      + [f"{name} the {job} comes early to buy what the day needs.", sounds[0]],
                      [_at(rng, "noon", stalls[2])] + stalls[3:6] + [weather[1], sounds[1]],
                      [_at(rng, "evening",
                           "the sellers pack their carts and the square grows quiet."), evenings[0], evenings[1],
                       rng.choice(FEELINGS)]]
    else:
        paragraphs = [[f"{season.title()} {prep} {ref} is a special time.", weather[0]] + looks[:2],
                      [_at(rng, "morning", doings[0]), doings[1], f"{name} the {job} {work[1]}.", sounds[0]],
                      [_at(rng, "noon", doings[2]), doings[3], f"Then {name} {work[2]}.", weather[1], looks[2],
                       sounds[1]],
                      [_at(rng, "evening",
                           f"the lights come on around {landmark}."), weather[2], evenings[0], evenings[1],
                       rng.choice(FEELINGS)]]
    return "\n\n".join(" ".join(p) for p in paragraphs)


# ---------------------------------------------------------------------------------------------------
# Prompts for the long texts: each names what the text will contain.

STORY_ASKS = ["Tell me a story about {who} who lives {where}.",
              "Write a long story about {h} the {kind} and {f} the {kind2}.",
              "Write a story about {h}, {a_kind}, and {brief}.", "Can you tell me a story with {h} and {f} in it?",
              "Tell me a bedtime story about {a_plain} named {h}.",
              "Write a story of several paragraphs set {where}, about {brief}.",
              "I would like a long story about {a_kind} and {a_kind2}.",
              "Write a story where {h} and {f} deal with {brief}."]
CONTINUE_ASKS = ["Continue this story: {first}", "Here is the start of a story. Go on: {first}",
                 "Finish this story: {first}"]
DESCRIBE_ASKS = {
    "market": ["Describe a day at the market {where}.", "What is market day like {where}?",
               "Write a few paragraphs about a market day {where}."],
    "season": ["Describe {place} in {season}.", "Write a few paragraphs about {season} {where}.",
               "What is {season} like {where}?"],
    "job": ["Describe a day in the life of {a_job}.", "What does {a_job} do all day?",
            "Write about the work of {a_job}."],
}


def long_sample(rng, continuation: bool = True) -> tuple[str, str]:
    """(prompt, text): a story (three in four) or a description, the prompt asking for it in one of several ways;
    with continuation, some prompts give a story's first sentence and the text is the rest of it."""
    if rng.random() < 0.75:
        cast = new_cast(rng)
        text = story(rng, cast)
        prep = PLACES[cast.place][0]
        if continuation and rng.random() < 0.15:  # the answer goes on from the prompt's first sentence
            first, rest = text.split(". ", 1)
            return rng.choice(CONTINUE_ASKS).format(first=first + "."), rest
        words = dict(h=cast.names[0], f=cast.names[1], kind=cast.kinds[0], kind2=cast.kinds[1], who=cast.who(0),
                     where=f"{prep} {cast.place}", brief=cast.event["brief"], a_plain=_a(cast.kinds[0]),
                     a_kind=_a(f"{cast.traits[0]} {cast.kinds[0]}"), a_kind2=_a(f"{cast.traits[1]} {cast.kinds[1]}"))
        return rng.choice(STORY_ASKS).format(**words), text
    topic, season, job = rng.choice(list(DESCRIBE_ASKS)), rng.choice(list(SEASONS)), rng.choice(list(JOBS))
    place = rng.choice(MARKET_PLACES if topic == "market" else list(PLACES))
    ask = rng.choice(DESCRIBE_ASKS[topic]).format(where=f"{PLACES[place][0]} {place}", place=place, season=season,
                                                  a_job=_a(job))
    return ask, description(rng, topic, place, season, job, rng.choice(NAMES))
