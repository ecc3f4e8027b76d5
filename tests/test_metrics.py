"""mm_jax.eval.metrics against known values: the official VQA normalisation and leave-one-out accuracy,
ANLS, relaxed accuracy, and CIDEr-D equal to pycocoevalcap's Cider on a fixed caption set."""
import pytest
from pycocoevalcap.cider.cider import Cider

from mm_jax.eval import metrics

# (answer, what the official vqaEval.py processPunctuation + processDigitArticle make of it)
NORMALIZED = [
    ("Two", "2"),
    ("the cat.", "cat"),            # a period not before a digit goes; "the" is an article
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("whats", "what's"),
    ("youre", "you're"),
    ("don't", "don't"),             # "'" is not in the punctuation list
    ("yes!", "yes"),                # "!" touching no space becomes a space
    ("yes !", "yes"),               # " !" touches one: deleted
    ("1,000", "1000"),              # a comma between digits: every mark deleted, none spaced
    ("1,000 t-shirts", "1000 tshirts"),
    ("t-shirt", "t shirt"),
    ("red,blue", "red blue"),
    ("red, blue", "red blue"),
    ("(yes)", "yes"),
    ("what's that?", "what's that"),
    ("3.5", "3.5"),                 # a period before a digit stays
    (".5", ".5"),
    ("3.", "3"),
    ("e.g.", "eg"),
    ("2:30", "2:30"),               # ":" is not in the list
    ("a", ""),
    ("An Apple", "apple"),
    ("the the", ""),
    ("one two three", "1 2 3"),
    ("none", "0"),
    ("ten.", "10"),                 # punctuation first, then the number words
    ("  Ten\tdogs\n", "10 dogs"),
    ("Im", "im"),                   # the table's capitalised keys never match lower-cased words
]


@pytest.mark.parametrize("answer,expected", NORMALIZED)
def test_normalize_vqa(answer, expected):
  assert metrics.normalize_vqa(answer) == expected


@pytest.mark.parametrize("matches,expected", [
    (0, 0.0),
    (1, (9 * 1 / 3 + 1 * 0) / 10),        # 9 subsets keep the one match, 1 loses it
    (2, (2 * 1 / 3 + 8 * 2 / 3) / 10),    # 0.6
    (3, (3 * 2 / 3 + 7 * 1) / 10),        # 0.9
    (4, 1.0),                             # any subset keeps at least 3
    (10, 1.0),
])
def test_vqa_accuracy_leave_one_out(matches, expected):
  answers = ["2"] * matches + ["3"] * (10 - matches)
  assert metrics.vqa_accuracy("two", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_known_values():
  assert metrics.vqa_accuracy("Two!", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
  assert metrics.vqa_accuracy("yes", ["yes"] * 10) == 1.0
  assert metrics.vqa_accuracy("no", ["yes"] * 10) == 0.0


def test_vqa_accuracy_answers_lose_punctuation_only_when_they_differ():
  # The official code leaves unanimous answers as stored, so "t-shirt" ("t shirt" normalised) misses
  # ten "t-shirt"s but matches three "t-shirt"s among other answers.
  assert metrics.vqa_accuracy("t-shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
  assert metrics.vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0


def test_vqa_accuracy_single_answer_is_normalised_exact_match():
  assert metrics.vqa_accuracy("Two", ["two"]) == 1.0
  assert metrics.vqa_accuracy("the dog.", "Dog") == 1.0
  assert metrics.vqa_accuracy("3", ["two"]) == 0.0


def test_exact_match():
  assert metrics.exact_match(" cat ", ["dog", "cat"]) == 1.0
  assert metrics.exact_match("Cat", ["cat"]) == 0.0
  assert metrics.exact_match("cat", "cat\n") == 1.0
  with pytest.raises(ValueError):
    metrics.exact_match("cat", [])


def test_anls():
  assert metrics.anls("helo", ["hello"]) == pytest.approx(1 - 1 / 5)
  assert metrics.anls(" HELLO ", ["hello"]) == 1.0
  assert metrics.anls("helo", ["xyz", "hello"]) == pytest.approx(0.8)  # the best answer
  assert metrics.anls("ab", ["abcd"]) == pytest.approx(0.5)  # at the threshold: kept
  assert metrics.anls("a", ["abc"]) == 0.0                   # 1 - 2/3 is below it
  assert metrics.anls("abc", ["xyz"]) == 0.0
  assert metrics.anls("a", ["abc"], threshold=0.3) == pytest.approx(1 / 3)
  assert metrics.anls("", [""]) == 1.0


def test_relaxed_accuracy():
  assert metrics.relaxed_accuracy("10.4", ["10"]) == 1.0   # 4 % off
  assert metrics.relaxed_accuracy("10.6", ["10"]) == 0.0   # 6 % off
  assert metrics.relaxed_accuracy("5%", ["0.05"]) == 1.0
  assert metrics.relaxed_accuracy("Yes", ["yes"]) == 1.0
  assert metrics.relaxed_accuracy("0", ["0"]) == 1.0       # zero target: string match
  assert metrics.relaxed_accuracy("1", ["0"]) == 0.0
  assert metrics.relaxed_accuracy("97", ["no", "100"]) == 1.0


# Pre-tokenised COCO-style captions: (prediction, references), lower-case, space-separated.
CAPTIONS = [
    ("a man riding a wave on top of a surfboard",
     ["a man riding a wave on a surfboard", "a surfer rides a large wave in the ocean",
      "a person on a surfboard riding a wave", "a man surfing on a big wave"]),
    ("a dog sitting on a couch", ["a dog laying on a couch", "a brown dog resting on the sofa",
                                  "a puppy sits on a couch in a living room"]),
    ("a plate of food with broccoli", ["a plate of food with meat and broccoli",
                                       "a white plate topped with food and vegetables",
                                       "broccoli and chicken on a plate", "a meal served on a plate"]),
    ("a cat laying on a bed", ["a cat sleeping on a bed", "a gray cat lying on the blanket",
                               "a cat curled up on a bed"]),
    ("a group of people standing around a table", ["people gathered around a table",
                                                   "a group of friends standing by a table",
                                                   "several people standing at a table with food"]),
    ("a red bus driving down a street", ["a red double decker bus on the street",
                                         "a bus driving down a city street", "a red bus in traffic",
                                         "a large red bus driving on a road"]),
    ("a man holding a tennis racket", ["a man swinging a tennis racket",
                                       "a tennis player holding a racket on a court",
                                       "a man playing tennis"]),
    ("a giraffe standing in a field", ["a giraffe standing in a grassy field",
                                       "a tall giraffe in the grass", "a giraffe next to some trees",
                                       "a giraffe walking in a field"]),
    ("a kitchen with a stove and a refrigerator", ["a kitchen with white appliances",
                                                   "a small kitchen with a stove and fridge",
                                                   "a clean kitchen with a refrigerator"]),
    ("a train on the tracks", ["a train traveling down the tracks", "a passenger train at a station",
                               "a long train on railroad tracks", "a train coming down the track"]),
    ("a bathroom with a toilet and a sink", ["a bathroom with a toilet and sink",
                                             "a white toilet next to a sink",
                                             "a small bathroom with a white toilet"]),
    ("a pizza on a table", ["a pizza sitting on top of a table", "a large pizza with cheese",
                            "a pizza on a wooden table", "a cheese pizza on a plate"]),
    ("a woman holding an umbrella", ["a woman walking with an umbrella in the rain",
                                     "a lady holding a pink umbrella", "a person with an umbrella"]),
    ("a clock tower in a city", ["a tall clock tower in the city", "a clock on top of a building",
                                 "a large clock tower", "a building with a clock in a town"]),
    ("a man on skis in the snow", ["a man skiing down a snowy hill", "a skier in the snow",
                                   "a person on skis going down a slope"]),
    ("a baseball player swinging a bat", ["a baseball player swinging a bat at a ball",
                                          "a batter swings at a pitch", "a man playing baseball",
                                          "a baseball player at home plate"]),
    ("an elephant walking in the dirt", ["an elephant walking on a dirt road",
                                         "a large elephant in the dirt",
                                         "an elephant standing near trees"]),
    ("a bowl of fruit on a table", ["a bowl full of fruit on a table", "apples and bananas in a bowl",
                                    "a bowl of oranges on a wooden table", "fruit in a bowl"]),
    ("two zebras standing in a field", ["two zebras grazing in a field", "a pair of zebras in the grass",
                                        "zebras standing next to each other"]),
    ("a laptop on a desk", ["a laptop computer sitting on a desk", "a desk with a laptop and a mouse",
                            "an open laptop on a wooden desk", "a computer on a desk"]),
    ("a boat in the water", ["a small boat floating on the water", "a boat on a lake",
                             "a sailboat in the water near the shore"]),
    ("a teddy bear", ["a brown teddy bear sitting on a chair", "a stuffed bear on a bed",
                      "a teddy bear with a red bow", "a child's teddy bear"]),
    ("motorcycle", ["a motorcycle parked on the street", "a black motorcycle", "a motorbike parked"]),
    ("", ["an empty street at night", "a street with no cars"]),
]


def test_cider_d_equals_pycocoevalcap():
  preds = {i: p for i, (p, _) in enumerate(CAPTIONS)}
  refs = {i: r for i, (_, r) in enumerate(CAPTIONS)}
  want_score, want_scores = Cider().compute_score(refs, {i: [p] for i, p in preds.items()})
  per_example = metrics.cider_d_per_example(preds, refs)
  assert list(per_example) == list(refs)
  for i, want in zip(refs, want_scores):
    assert per_example[i] == pytest.approx(float(want), abs=1e-9, rel=0)
  assert metrics.cider_d(preds, refs) == pytest.approx(float(want_score), abs=1e-9, rel=0)
  assert 0.0 < want_score and per_example[len(CAPTIONS) - 1] == 0.0  # the empty prediction scores 0


def test_cider_d_depends_on_the_set():
  # The document frequencies come from the evaluated set's references: a subset scores differently.
  preds = {i: p for i, (p, _) in enumerate(CAPTIONS[:5])}
  refs = {i: r for i, (_, r) in enumerate(CAPTIONS[:5])}
  want, _ = Cider().compute_score(refs, {i: [p] for i, p in preds.items()})
  assert metrics.cider_d(preds, refs) == pytest.approx(float(want), abs=1e-9, rel=0)
  with pytest.raises(ValueError):
    metrics.cider_d(preds, {0: refs[0]})


def test_registries():
  assert set(metrics.METRICS) == {"vqa_accuracy", "exact_match", "anls", "relaxed_accuracy"}
  assert all(f("cat", ["cat"]) == 1.0 for f in metrics.METRICS.values())
  assert metrics.corpus_metrics == {"cider_d": metrics.cider_d}
