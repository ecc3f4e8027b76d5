"""The scores vision-language papers report, computed the way their official evaluation code does.

Per-example metrics take a prediction and the reference answers and give a float in [0, 1]:
vqa_accuracy (VQAv2 / EvalAI), exact_match, anls (DocVQA), relaxed_accuracy (ChartQA). Corpus metrics
take every prediction at once: cider_d (COCO captions, as pycocoevalcap's Cider computes it).

  from mm_jax.eval import metrics

  metrics.METRICS["vqa_accuracy"]("Two", ["2"] * 3 + ["3"] * 7)      # 0.9
  metrics.anls("helo", ["hello"])                                     # 0.8
  preds = {1: "a dog runs", 2: "a red car"}                          # {id: caption}, pre-tokenised
  refs = {1: ["a dog is running", "a dog runs"], 2: ["a car parked", "a red car on a road"]}
  metrics.corpus_metrics["cider_d"](preds, refs)  # the idf comes from refs: pass the whole split

An evaluator picks one by its config name from METRICS or corpus_metrics.
"""
import math
import re
from collections import Counter

import editdistance
import numpy as np

# ---------------------------------------------------------------------------------------------------
# VQAv2 answer normalisation. The tables define the metric: they are the official evaluation's
# (GT-Vision-Lab/VQA vqaEval.py, the one the EvalAI server runs), entry for entry.

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # the keys with capitals (Im, Ive, ...) never fire: words are lower-cased first, as officially
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
               "`", ",", "?", "!")  # not "." (below) nor "'" (contractions keep theirs)
_DIGIT_COMMA = re.compile(r"\d,\d")
# The official "(?!<=\d)" is a mistyped lookbehind that never blocks: every period not followed by a
# digit goes, so "3.5" and ".5" keep theirs and "3." loses it.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def _process_punctuation(text: str) -> str:
  # A mark next to a space, or any mark at all once the text has a comma between digits, is deleted
  # ("1,000" -> "1000", "red, blue" -> "red blue"); otherwise it becomes a space ("t-shirt" ->
  # "t shirt"). The tests look at the input text, not the text as edited so far, as officially.
  delete_all = _DIGIT_COMMA.search(text) is not None
  out = text
  for p in PUNCTUATION:
    out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
  # The official code passes re.UNICODE (32) where sub takes its count: at most 32 periods go.
  return _PERIOD.sub("", out, count=re.UNICODE)


def _process_digit_article(text: str) -> str:
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa(answer: str) -> str:
  """An answer as the official VQA evaluation compares it: "Two dogs!" -> "2 dogs"."""
  answer = answer.replace("\n", " ").replace("\t", " ").strip()
  return _process_digit_article(_process_punctuation(answer))


def _as_list(answers) -> list[str]:
  answers = [answers] if isinstance(answers, str) else list(answers)
  if not answers:
    raise ValueError("no reference answers")
  return answers


# ---------------------------------------------------------------------------------------------------
# Per-example metrics: (prediction, answers) -> float.

def vqa_accuracy(prediction: str, answers: list[str]) -> float:
  """VQAv2 accuracy: the mean, over leaving each human answer out, of min(#others that match / 3, 1).

  As the official code: the prediction is fully normalised (normalize_vqa); the answers, which the
  VQAv2 annotations store already normalised, only lose their punctuation, and only when they are
  not all the same. With one answer, leave-one-out would always give 0, so it is exact match of the
  two normalised strings instead.
  """
  answers = _as_list(answers)
  pred = normalize_vqa(prediction)
  if len(answers) == 1:
    return float(pred == normalize_vqa(answers[0]))
  if len(set(answers)) > 1:
    answers = [_process_punctuation(a) for a in answers]
  n, m = len(answers), sum(a == pred for a in answers)
  # Leaving out one of the m matches leaves m - 1 of them; leaving out any other answer leaves m.
  return (m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)) / n


def exact_match(prediction: str, answers: list[str]) -> float:
  """1 if the prediction equals one of the answers (both stripped of surrounding whitespace)."""
  pred = prediction.strip()
  return float(any(pred == a.strip() for a in _as_list(answers)))


def _similarity(a: str, b: str) -> float:
  longest = max(len(a), len(b))
  return 1.0 if longest == 0 else 1.0 - editdistance.eval(a, b) / longest


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
  """DocVQA ANLS of one question: the best over the answers of 1 - Levenshtein / the longer length
  (lower-cased, stripped), 0 where that similarity is below the threshold."""
  pred = prediction.lower().strip()
  best = max(_similarity(pred, a.lower().strip()) for a in _as_list(answers))
  return best if best >= threshold else 0.0


def _to_float(text: str) -> float | None:
  try:
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)
  except ValueError:
    return None


def relaxed_accuracy(prediction: str, answers: list[str], tolerance: float = 0.05) -> float:
  """ChartQA relaxed accuracy (pix2struct's): a number within 5 % of a non-zero numeric answer
  ("12%" reads 0.12), else case-insensitive exact match; 1 if any answer accepts it."""
  pred = prediction.strip()
  pred_num = _to_float(pred)

  def ok(answer: str) -> bool:
    answer = answer.strip()
    target = _to_float(answer)
    if pred_num is not None and target:  # a zero target falls back to the string, as in pix2struct
      return abs(pred_num - target) / abs(target) <= tolerance
    return pred.lower() == answer.lower()

  return float(any(ok(a) for a in _as_list(answers)))


# ---------------------------------------------------------------------------------------------------
# CIDEr-D, as pycocoevalcap 1.2's Cider (its CiderScorer is the D variant: clipped tf-idf, a Gaussian
# length penalty, sigma 6, no stemming), on pre-tokenised, lower-case, space-separated strings.

CIDER_N = 4
CIDER_SIGMA = 6.0


def _ngrams(sentence: str) -> Counter:
  words = sentence.split()
  return Counter(tuple(words[i:i + k]) for k in range(1, CIDER_N + 1) for i in range(len(words) - k + 1))


def _tfidf(counts: Counter, df: Counter, log_images: float):
  """Per-order {ngram: tf * idf}, per-order norms, and the length the penalty compares."""
  vec = [{} for _ in range(CIDER_N)]
  for gram, tf in counts.items():
    vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, df[gram])))
  norms = [math.sqrt(sum(v * v for v in order.values())) for order in vec]
  # pycocoevalcap counts the bigrams here (its n == 1 is the second order), not the words: matched.
  length = sum(counts[g] for g in vec[1])
  return vec, norms, length


def _cider_sim(hyp, ref) -> np.ndarray:
  (vh, nh, lh), (vr, nr, lr) = hyp, ref
  val = np.zeros(CIDER_N)
  for k in range(CIDER_N):
    # The clipping of CIDEr-D: a hypothesis n-gram counts at most as often as in the reference.
    val[k] = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
    if nh[k] != 0 and nr[k] != 0:
      val[k] /= nh[k] * nr[k]
  return val * np.e ** (-((lh - lr) ** 2) / (2 * CIDER_SIGMA ** 2))


def cider_d_per_example(predictions: dict, references: dict) -> dict:
  """{id: CIDEr-D of predictions[id] against references[id]}; the document frequencies are counted
  over the references of exactly this set, so a score depends on the set it is computed in."""
  if predictions.keys() != references.keys():
    raise ValueError("predictions and references must have the same ids")
  refs = {i: [_ngrams(r) for r in _as_list(references[i])] for i in references}
  df = Counter(g for grams in refs.values() for g in set().union(*grams))
  log_images = math.log(float(len(refs)))
  scores = {}
  for i, ref_grams in refs.items():
    hyp = _tfidf(_ngrams(predictions[i]), df, log_images)
    total = sum(_cider_sim(hyp, _tfidf(r, df, log_images)) for r in ref_grams)
    scores[i] = float(np.mean(total) / len(ref_grams) * 10.0)
  return scores


def cider_d(predictions: dict, references: dict) -> float:
  """Corpus CIDEr-D (pycocoevalcap's Cider score): the mean of cider_d_per_example."""
  return float(np.mean(list(cider_d_per_example(predictions, references).values())))


METRICS = {
    "vqa_accuracy": vqa_accuracy,
    "exact_match": exact_match,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
}
corpus_metrics = {"cider_d": cider_d}
