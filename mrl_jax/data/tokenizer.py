"""BERT's WordPiece tokenizer, in pure Python, for the text tower.

Why WordPiece: the ALIGN text tower is BERT-Base, and every Google BERT
checkpoint ships the `vocab.txt` it was trained with, so reusing BERT's
tokenizer means a pretrained text tower can be dropped in later and any
released BERT vocabulary works unchanged. The uncased English vocabulary
(30,522 tokens) is the `vocab.txt` inside
  gs://cloud-tpu-checkpoints/bert/v3/uncased_L-12_H-768_A-12/vocab.txt
  https://storage.googleapis.com/bert_models/2018_10_18/uncased_L-12_H-768_A-12.zip
or HuggingFace's https://huggingface.co/bert-base-uncased (file vocab.txt).
Small vocabularies for demos and tests come from `build_vocab` + `write_vocab`.

The algorithm is BERT's (google-research/bert tokenization.py): clean the
text (drop NUL, U+FFFD and control characters; any whitespace becomes a
space), put spaces around CJK ideographs, split on whitespace, optionally
lowercase and strip accents (NFD, drop combining marks), split off every
punctuation character, then split each word greedily into the longest vocab
pieces, continuations prefixed '##'. A word with no such split, or longer
than 100 characters (HuggingFace's limit; google-research/bert's is 200),
becomes [UNK].

Encoding format (`encode_batch`): ids int32 [B, L] = [CLS] pieces [SEP]
then [PAD] (id 0) up to L, so the model's padding mask is `ids != 0`. A text
whose pieces do not fit is cut to L - 2 pieces, still ending in [SEP], and
flagged in `truncated`; an empty or whitespace-only text encodes as
[CLS] [SEP] and is flagged in `empty`.

Pure Python + numpy (no TensorFlow, no JAX) so that it runs inside Grain
worker processes. A file is read through `etils.epath`, so gs:// paths work.
"""
from __future__ import annotations

import collections
from typing import Iterable, Sequence
import unicodedata

from etils import epath
import numpy as np

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
REQUIRED_SPECIALS = (PAD, UNK, CLS, SEP)
SPECIALS = (PAD, UNK, CLS, SEP, MASK)  # what build_vocab puts first
MAX_INPUT_CHARS_PER_WORD = 100
# Distinct space-separated chunks remembered; captions repeat a lot, but a
# long-running input worker should not grow without bound.
_CACHE_SIZE = 1 << 20

Text = str | bytes


# ------------------------------------------------------------- basic tokenizer

def _is_whitespace(char: str) -> bool:
  # \t, \n, \r are control characters to unicodedata but whitespace here.
  return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char: str) -> bool:
  return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_punctuation(char: str) -> bool:
  # All non-alphanumeric ASCII counts (e.g. '$', '^', '`' are not Unicode
  # punctuation), as in BERT.
  cp = ord(char)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(char).startswith("P")


def _is_cjk(cp: int) -> bool:
  # The CJK Unified Ideographs blocks (not Hangul or kana, which are written
  # with spaces or tokenised like other scripts), as in BERT.
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF
          or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
          or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
          or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _clean_and_space_cjk(text: str) -> str:
  out = []
  for char in text:
    cp = ord(char)
    if cp == 0 or cp == 0xFFFD or _is_control(char):
      continue
    if _is_whitespace(char):
      out.append(" ")
    elif _is_cjk(cp):
      out.extend((" ", char, " "))
    else:
      out.append(char)
  return "".join(out)


def _strip_accents(text: str) -> str:
  return "".join(c for c in unicodedata.normalize("NFD", text)
                 if unicodedata.category(c) != "Mn")


def _split_on_punctuation(word: str) -> list[str]:
  pieces, current = [], []
  for char in word:
    if _is_punctuation(char):
      if current:
        pieces.append("".join(current))
        current = []
      pieces.append(char)
    else:
      current.append(char)
  if current:
    pieces.append("".join(current))
  return pieces


def basic_tokenize(text: Text, *, lowercase: bool = True) -> list[str]:
  """BERT's BasicTokenizer: whole words and punctuation marks, no WordPiece."""
  if isinstance(text, bytes):
    text = text.decode("utf-8", "ignore")  # as BERT's convert_to_unicode
  words = []
  # str.split(), as BERT: after cleaning it also splits on U+2028/U+2029.
  for word in _clean_and_space_cjk(text).split():
    if lowercase:
      word = _strip_accents(word.lower())
    words.extend(_split_on_punctuation(word))
  return [w for w in words if w]  # Stripping accents can empty a word.


# ------------------------------------------------------------------- WordPiece

def _wordpiece(word: str, vocab: dict[str, int], unk: int) -> list[int]:
  """Greedy longest-match-first split of one word into vocab ids."""
  if len(word) > MAX_INPUT_CHARS_PER_WORD:
    return [unk]
  ids, start = [], 0
  while start < len(word):
    for end in range(len(word), start, -1):
      piece = word[start:end] if start == 0 else "##" + word[start:end]
      if piece in vocab:
        ids.append(vocab[piece])
        start = end
        break
    else:  # No prefix of the rest is in the vocab: the whole word is unknown.
      return [unk]
  return ids


class WordPieceTokenizer:
  """BERT's FullTokenizer from a vocab.txt (one token per line, line = id).

  `lowercase=True` for uncased vocabularies (it also strips accents, as
  BERT's do_lower_case does); False for cased ones. `max_len` is the padded
  length L of `encode_batch`, [CLS] and [SEP] included.
  """

  def __init__(self, vocab_path: epath.PathLike, *, lowercase: bool = True,
               max_len: int):
    path = epath.Path(vocab_path)
    fix = ("pass the vocab.txt of a BERT checkpoint (e.g. "
           "gs://cloud-tpu-checkpoints/bert/v3/uncased_L-12_H-768_A-12/vocab.txt) "
           "or write one with mrl_jax.data.tokenizer.build_vocab + write_vocab")
    if not path.exists():
      raise FileNotFoundError(f"WordPiece vocabulary {path} does not exist; {fix}.")
    try:
      text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(
          f"WordPiece vocabulary {path} could not be read as UTF-8 text "
          f"({type(e).__name__}: {e}); {fix}.") from e
    tokens = text.split("\n")
    if tokens and tokens[-1] == "":  # The final newline ends a line, not a token.
      tokens.pop()
    self._setup([t.rstrip("\r") for t in tokens], lowercase=lowercase,
                max_len=max_len, source=f"WordPiece vocabulary {path}")

  @classmethod
  def from_vocab(cls, tokens: Sequence[str], *, lowercase: bool = True,
                 max_len: int) -> WordPieceTokenizer:
    """A tokenizer from an in-memory token list (index = id)."""
    self = cls.__new__(cls)
    self._setup(list(tokens), lowercase=lowercase, max_len=max_len,
                source="WordPiece vocabulary (in-memory token list)")
    return self

  def _setup(self, tokens: list[str], *, lowercase: bool, max_len: int,
             source: str):
    if not tokens:
      raise ValueError(
          f"{source} is empty; it needs one token per line with "
          f"{list(REQUIRED_SPECIALS)} among them ([PAD] on the first line).")
    missing = [t for t in REQUIRED_SPECIALS if t not in tokens]
    if missing:
      raise ValueError(
          f"{source} lacks the special tokens {missing}; add them (one per "
          f"line, [PAD] first) or use a BERT vocab.txt, which has them all.")
    if tokens[0] != PAD:
      raise ValueError(
          f"{source} has {tokens[0]!r} at id 0, but [PAD] must be id 0 (the "
          "model's padding mask is ids != 0); move [PAD] to the first line.")
    if not isinstance(max_len, int) or max_len < 2:
      raise ValueError(
          f"max_len={max_len!r} must be an int >= 2 (room for [CLS] and [SEP]).")
    self._tokens = tokens
    # Later duplicates win, as in BERT's load_vocab.
    self._vocab = {t: i for i, t in enumerate(tokens)}
    self.lowercase, self.max_len = lowercase, max_len
    self.pad_id, self.unk_id = self._vocab[PAD], self._vocab[UNK]
    self.cls_id, self.sep_id = self._vocab[CLS], self._vocab[SEP]
    self._cache: dict[str, list[int]] = {}

  @property
  def vocab_size(self) -> int:
    return len(self._tokens)

  def _encode_chunk(self, chunk: str) -> list[int]:
    ids = self._cache.get(chunk)
    if ids is None:
      ids = [i for word in basic_tokenize(chunk, lowercase=self.lowercase)
             for i in _wordpiece(word, self._vocab, self.unk_id)]
      if len(self._cache) >= _CACHE_SIZE:
        self._cache.clear()
      self._cache[chunk] = ids
    return ids

  def encode(self, text: Text) -> list[int]:
    """WordPiece ids of `text`, without [CLS]/[SEP]."""
    if isinstance(text, bytes):
      text = text.decode("utf-8", "ignore")  # as BERT's convert_to_unicode
    # Every step of BERT's pipeline acts within space-separated chunks (a
    # space is whitespace to it, and nothing merges across one), so the
    # chunks can be tokenised, and cached, one at a time.
    return [i for chunk in text.split(" ") if chunk for i in self._encode_chunk(chunk)]

  def encode_batch(self, texts: Iterable[Text], max_len: int | None = None
                   ) -> dict[str, np.ndarray]:
    """{'ids': int32 [B, L], 'truncated': int32 [B], 'empty': int32 [B]}."""
    length = self.max_len if max_len is None else max_len
    if not isinstance(length, int) or length < 2:
      raise ValueError(
          f"max_len={length!r} must be an int >= 2 (room for [CLS] and [SEP]).")
    encoded = [self.encode(t) for t in texts]
    ids = np.full((len(encoded), length), self.pad_id, np.int32)
    truncated = np.zeros(len(encoded), np.int32)
    empty = np.zeros(len(encoded), np.int32)
    for row, pieces in enumerate(encoded):
      if len(pieces) > length - 2:
        pieces, truncated[row] = pieces[:length - 2], 1
      empty[row] = not pieces
      ids[row, :len(pieces) + 2] = [self.cls_id, *pieces, self.sep_id]
    return {"ids": ids, "truncated": truncated, "empty": empty}

  def id_to_token(self, i: int) -> str:
    return self._tokens[i]

  def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
    """Readable text for debugging: '##' pieces rejoined, [PAD] dropped."""
    skip = {self.pad_id} | ({self.cls_id, self.sep_id} if skip_special else set())
    words: list[str] = []
    for i in ids:
      if int(i) in skip:
        continue
      token = self._tokens[int(i)]
      if token.startswith("##") and words:
        words[-1] += token[2:]
      else:
        words.append(token)
    return " ".join(words)


# --------------------------------------------------------- small vocabularies

def build_vocab(texts: Iterable[Text], *, min_count: int = 1,
                lowercase: bool = True) -> list[str]:
  """Specials, then every whole word seen >= min_count times.

  Words are sorted by count (descending), then alphabetically. Every word is
  its own token, so there are no '##' pieces: unseen words become [UNK].
  Meant for demos and tests; real runs use a BERT vocab.txt.
  """
  counts = collections.Counter(
      w for t in texts for w in basic_tokenize(t, lowercase=lowercase))
  words = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIALS),
                 key=lambda w: (-counts[w], w))
  return [*SPECIALS, *words]


def write_vocab(tokens: Sequence[str], path: epath.PathLike) -> epath.Path:
  """Writes `tokens` one per line (BERT's vocab.txt format); returns the path."""
  bad = [t for t in tokens if not t or "\n" in t or "\r" in t]
  if bad:
    raise ValueError(f"vocabulary tokens must be non-empty single lines; got {bad[:5]}.")
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
  return path
