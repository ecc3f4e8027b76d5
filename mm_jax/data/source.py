r"""The Source record: what the pipelines and the validator need of a dataset (data.SOURCES).

  src = data.get(config.data.name)
  raw = src.open(config.data, "train")               # the split's TFDS random-access source
  r, k = src.element(config.data, len(raw), j)       # training element j: element k of record r
  question, answer = src.texts(raw[r], k)

Record r of a split makes num_questions question elements (k < num_questions, the question of kind
kinds[k]) and, in training only, caption elements (k == caption_element: a prompt and the record's
caption), round(data.caption_ratio x records) of them, their records spread evenly over the split.
Training element j < records x num_questions is question j % num_questions of record
j // num_questions; the caption elements follow. Eval elements are the question elements.
"""
import dataclasses
from typing import Any, Callable, NamedTuple

from mm_jax.data.conversation import Conversation, Image, Turn


class RecordTexts(NamedTuple):
  """The texts of a record: elements[k] the (question, answer) of its element k, and its caption."""
  elements: list[tuple[str, str]]
  caption: str


@dataclasses.dataclass(frozen=True)
class Source:
  """A dataset: its splits, how to open one, its tokenizer, and how its records become elements."""
  splits: tuple[str, ...]
  open: Callable[..., Any]        # (data_cfg, split, text_only=False) -> the split's TFDS random-access
                                  # source, the data built first if needed; text_only: images undecoded
  tokenizer: Callable[[Any], str]  # data_cfg -> the path of the dataset's SentencePiece model
  kinds: tuple[str, ...]          # the question kinds, the evaluation's per-kind scores
  texts: Callable[[Any, int], tuple[str, str]]  # (record, k) -> (question, answer) of its element k
  field: Callable[[int], str]     # k -> the record field element k's text comes from (in BadRecords)
  caption: Callable[[Any], str]   # record -> its caption (the contrastive text)
  # (record, k) -> element k as a Conversation; None: one user turn (the image, then the question)
  # and the answer, from texts()
  to_conversation: Callable[[Any, int], Conversation] | None = None
  # True: each record is one whole conversation (one element, no caption elements, kinds from
  # record_kind); its lengths are checked as the pipeline reads it, under data.bad_records
  conversations: bool = False
  record_kind: Callable[[Any], str] | None = None
  # (record, k) -> every reference answer of element k (e.g. VQAv2's ten); None: the answer alone
  references: Callable[[Any, int], list[str]] | None = None

  def conversation(self, record, k: int) -> Conversation:
    """Element k of a record in the one example schema (data/conversation.py)."""
    if self.to_conversation is not None:
      return self.to_conversation(record, k)
    question, answer = self.texts(record, k)
    return Conversation(turns=(Turn("user", (Image(0), question)), Turn("assistant", (answer,))),
                        images=(record["image"],))

  def kind(self, record, k: int) -> str:
    """The kind element k of a record is scored under ('' for a caption)."""
    if self.record_kind is not None:
      return self.record_kind(record)
    return self.kinds[k] if k < len(self.kinds) else ""

  @property
  def num_questions(self) -> int:
    """Question elements per record."""
    return len(self.kinds)

  @property
  def caption_element(self) -> int:
    """The k of a record's caption element."""
    return len(self.kinds)

  def num_captions(self, data_cfg, num_records: int) -> int:
    """Captioning elements per epoch: data.caption_ratio per record (0 turns them off).

    PaliGemma-style task mixing: a caption naming every object is a dense grounding signal beside
    one-word answers; the ratio keeps its many tokens from swamping the answers in the token-mean loss.
    """
    return 0 if self.conversations else round(data_cfg.caption_ratio * num_records)

  def num_elements(self, data_cfg, num_records: int, train: bool = True) -> int:
    captions = self.num_captions(data_cfg, num_records) if train else 0
    return num_records * self.num_questions + captions

  def record_texts(self, record) -> RecordTexts:
    """Every text of a record (its elements' and its caption), decoded."""
    return RecordTexts([self.texts(record, k) for k in range(self.caption_element + 1)],
                       self.caption(record))

  def element(self, data_cfg, num_records: int, j: int) -> tuple[int, int]:
    """(record, k) of element j."""
    if j < num_records * self.num_questions:
      return divmod(j, self.num_questions)
    c = j - num_records * self.num_questions
    return c * num_records // self.num_captions(data_cfg, num_records), self.caption_element
