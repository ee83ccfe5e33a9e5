"""What a token is: the one place that turns text into token ids and back (dataset.tokenizer).

- `bytes` (the default, BDH's reference choice): the tokens are the UTF-8 bytes of the text,
  vocabulary 256, and the separator is the byte 0x00.
- the path of a Hugging Face tokenizer.json, for example the byte-level BPE that
  `python prepare.py --train-tokenizer` trains on the user's shards. Its separator is the special
  token <|endoftext|>, which the tokenizer must have.

Each document is followed by the separator, which marks document boundaries and starts generation
when there is no prompt. With a tokenizer.json, a literal "<|endoftext|>" in the text is encoded as
ordinary text, unless the tokenizer's vocabulary has it as an ordinary token too (a Unigram trained
with it as a special token): then it is the separator, and the run says so (separator_in_text);
with bytes, a NUL byte in the text is the separator byte (printed as <|endoftext|>: shown). Invalid
UTF-8 in the data is taken byte for byte by `bytes` and replaced by U+FFFD for a tokenizer.json;
decoding replaces what is not valid UTF-8.

Bits per byte (evaluation.tokens_per_byte) count the UTF-8 bytes the validation tokens decode to,
and 1 for each separator, as for the separator byte of `bytes`: so a validation loss in bits per
byte compares across vocabularies, and for `bytes` it is the loss / ln 2. For bytes and byte-level
BPEs (exact_bytes) every token has its byte length (token_bytes); for other tokenizers a token's
bytes depend on its neighbours (SentencePiece's '▁'), and the text is decoded instead.
"""
import difflib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from files import near_miss, relative_to_here
from runtime import first_line

SEPARATOR_TOKEN = "<|endoftext|>"
# what a terminal acts on rather than shows (escape sequences, a bell, a switch of character set): all
# C0 and C1 controls but tab and line ends
CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Text as printed: its control characters as \\xNN escapes (an undertrained model writes them)."""
    return CONTROLS.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


class TokenizerError(Exception):
    pass


class NotATokenizer(TokenizerError):
    """A file that is no tokenizer.json at all."""


def byte_level_alphabet() -> list[str]:
    """The character a byte-level BPE writes for each byte 0..255 (GPT-2's scheme): the printable
    bytes stand for themselves, the others, in order, for the characters from U+0100 on."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, others = [], 0
    for byte in range(256):
        chars.append(chr(byte) if byte in printable else chr(0x100 + others))
        others += byte not in printable
    return chars


class ByteTokenizer:
    name = "bytes"
    exact_bytes = True
    vocab_size = n_tokens = 256
    separator = 0
    dtype = np.uint8  # of the token streams
    token_bytes = np.ones(256, dtype=np.int64)
    turned_off = []  # (HFTokenizer: the file's padding or truncation)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(t) for t in ids).decode("utf-8", errors="replace")

    @staticmethod
    def shown(text: str) -> str:
        """Decoded text as printed: the separator byte as <|endoftext|>, as a tokenizer.json shows its
        own, not a NUL that makes a terminal log a binary file; other control characters escaped."""
        return printable(text.replace("\x00", SEPARATOR_TOKEN))

    def encode_documents(self, docs: pa.Array) -> np.ndarray:
        """A large_binary array of non-empty documents as one stream, each document followed by
        the separator."""
        offsets = np.frombuffer(docs.buffers()[1], dtype=np.int64)[docs.offset:docs.offset + len(docs) + 1]
        data = np.frombuffer(docs.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
        ends = offsets[1:] - offsets[0] + np.arange(len(docs))  # where each separator lands
        out = np.empty(len(data) + len(docs), dtype=np.uint8)
        is_text = np.ones(len(out), dtype=bool)
        is_text[ends] = False
        out[is_text] = data
        out[ends] = self.separator
        return out

    def to_str(self) -> str:
        return "bytes"

    def to_hf_json(self) -> str:
        """These byte tokens as a Hugging Face tokenizer.json: a byte-level BPE without merges whose
        id for each byte is the byte."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        tok = Tokenizer(models.BPE(vocab={char: byte for byte, char in enumerate(byte_level_alphabet())}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return tok.to_str()


class HFTokenizer:
    """A Hugging Face tokenizer.json (the `tokenizers` library). Encodes in batches
    (encode_batch_fast), one thread per process: the DataLoader workers are the parallelism, and
    tokenizers' thread pool would not survive their fork."""

    def __init__(self, json_text: str, name: str):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer
        try:
            self.tok = Tokenizer.from_str(json_text)
        except Exception as e:
            try:
                parsed = json.loads(json_text)
                why = (f"JSON, but not laid out as one: {first_line(e)}" if isinstance(parsed, dict) and "model" in parsed
                       else "JSON without the `model` section a tokenizer.json has")
            except ValueError as not_json:
                why = f"not JSON: {not_json}"
            raise NotATokenizer(f"{name}: not a Hugging Face tokenizer.json ({why})")
        # padding and truncation (saved by enable_padding, enable_truncation) would add pad tokens to each
        # document, or cut it: training reads whole documents, joined
        spec = json.loads(self.tok.to_str())
        self.turned_off = [key for key, value in spec.items() if key in ("padding", "truncation") and value]
        self.tok.no_padding()
        self.tok.no_truncation()
        if (processor := byte_level_only(spec.get("post_processor"))) != spec.get("post_processor"):
            # a template that adds tokens around each text ([CLS] ... [SEP], Llama's <s>): never applied here
            # (encode: add_special_tokens=False), so not in the file an export writes either, where
            # Transformers would apply it to every prompt
            self.tok = Tokenizer.from_str(json.dumps({**json.loads(self.tok.to_str()), "post_processor": processor}))
        self.json, self.name = self.tok.to_str(), name
        self.tok.encode_special_tokens = True  # text never turns into special tokens (not saved in the json)
        self.separator = self.tok.token_to_id(SEPARATOR_TOKEN)
        if self.separator is None and self.json == ByteTokenizer().to_hf_json():
            raise TokenizerError(f"{name}: the byte tokens, as export.py writes them for Hugging Face; to train "
                                 f"on bytes, set dataset.tokenizer=bytes")
        if self.separator is None:
            raise TokenizerError(f"{name}: the tokenizer has no {SEPARATOR_TOKEN} token, which separates "
                                 f"documents; add it as a special token, or train one with "
                                 f"python prepare.py --train-tokenizer")
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1  # (the rows the model needs: ids, not tokens, where ids skip some)
        self.n_tokens = len(set(vocab.values()))
        self.exact_bytes = (json.loads(self.json).get("decoder") or {}).get("type") == "ByteLevel"
        self.dtype = np.uint16 if self.vocab_size <= 2**16 else np.uint32
        self.token_bytes = self._byte_lengths(vocab) if self.exact_bytes else None  # (see the module's doc)

    def __reduce__(self):  # DataLoader workers started by spawn rebuild it from the json
        return HFTokenizer, (self.json, self.name)

    def _byte_lengths(self, vocab: dict) -> np.ndarray:
        """A byte-level BPE writes each byte of a token as one character of its 256-character
        alphabet, so its length is its number of characters; an added token matches its text as it
        is (its "café" is 5 bytes, though each of its letters is in that alphabet)."""
        alphabet = set(byte_level_alphabet())
        added = {i: token.content for i, token in self.tok.get_added_tokens_decoder().items()}
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in vocab.items():
            if i in added:
                lengths[i] = len(added[i].encode("utf-8"))
            elif alphabet.issuperset(token):
                lengths[i] = len(token)
            else:
                lengths[i] = len(self.tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        lengths[self.separator] = 1
        return lengths

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(t) for t in ids], skip_special_tokens=False)

    @staticmethod
    def shown(text: str) -> str:
        return printable(text)

    def encode_documents(self, docs: pa.Array) -> np.ndarray:
        texts = [doc.decode("utf-8", errors="replace") for doc in docs.to_pylist()]
        encodings = self.tok.encode_batch_fast(texts, add_special_tokens=False)
        ends = np.cumsum([len(e.ids) + 1 for e in encodings])
        out = np.empty(ends[-1] if len(ends) else 0, dtype=self.dtype)
        for encoding, end in zip(encodings, ends):
            out[end - 1 - len(encoding.ids):end - 1] = encoding.ids
        out[ends - 1] = self.separator
        return out

    def to_str(self) -> str:
        return self.json

    to_hf_json = to_str


def byte_level_only(processor: dict | None) -> dict | None:
    """A tokenizer.json's post_processor without what adds tokens to a text: a ByteLevel one (it
    only moves offsets) is kept, alone or in a Sequence."""
    if not processor or processor.get("type") == "ByteLevel":
        return processor
    kept = [p for p in processor.get("processors", []) if p.get("type") == "ByteLevel"]  # (a Sequence's)
    return None if not kept else kept[0] if len(kept) == 1 else {**processor, "processors": kept}


def load_tokenizer(spec: str):
    """`bytes`, or the path of a tokenizer.json."""
    if spec == "bytes":
        return ByteTokenizer()
    if Path(spec).is_dir():
        inside = Path(spec) / "tokenizer.json"
        hint = f"; it holds one: dataset.tokenizer={inside}" if inside.is_file() else ""
        raise TokenizerError(f"dataset.tokenizer: {spec} is a folder, not a tokenizer.json{hint}")
    try:
        text = Path(spec).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TokenizerError(f"dataset.tokenizer: {spec}: not a Hugging Face tokenizer.json (not text: a binary "
                             f"file); {HOW_TO_NAME_ONE}") from None
    except FileNotFoundError:
        if difflib.get_close_matches(spec.strip().lower(), ["bytes"], cutoff=0.75):
            raise TokenizerError(f"dataset.tokenizer: {spec} is no file: did you mean bytes?") from None
        if Path(f"{spec}.json").is_file():
            raise TokenizerError(f"dataset.tokenizer: {spec} does not exist; did you mean {spec}.json?") from None
        if near := near_miss(spec, Path.is_file):  # tokenzer.json
            raise TokenizerError(f"dataset.tokenizer: {spec} does not exist; did you mean {near}?") from None
        raise TokenizerError(f"dataset.tokenizer: {spec} does not exist{relative_to_here(spec)}{hub_hint(spec)}; "
                             f"{HOW_TO_NAME_ONE}") from None
    except OSError as e:
        raise TokenizerError(f"dataset.tokenizer: cannot read {spec} ({e.strerror or e}); {HOW_TO_NAME_ONE}") from None
    try:
        return HFTokenizer(text, spec)
    except NotATokenizer as e:
        raise TokenizerError(f"dataset.tokenizer: {e}; {HOW_TO_NAME_ONE}") from None
    except TokenizerError as e:
        raise TokenizerError(f"dataset.tokenizer: {e}") from None


def hub_hint(spec: str) -> str:
    """For a missing dataset.tokenizer named as a Hugging Face Hub model is (gpt2, org/model-1.5B, or
    its address): nothing is downloaded, and how to save its tokenizer.json. Not for what reads as a
    local path: a file name's suffix (.json, .model, .txt), or a first folder that exists here."""
    name = spec.removeprefix("https://huggingface.co/")
    first, _, rest = name.partition("/")
    if (not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) or name.lower() == "tokenizer"
            or re.search(r"\.(json|model|txt|vocab|bin|pt|yaml|yml)$", name, re.IGNORECASE)
            or rest and Path(first).is_dir()):
        return ""
    return (f"; a Hugging Face Hub name is not fetched: save its tokenizer.json first (tokenizers' "
            f"Tokenizer.from_pretrained({name!r}).save('tokenizer.json'))")


HOW_TO_NAME_ONE = ("give the path of a tokenizer.json (python prepare.py --train-tokenizer writes one, as does the "
                   "tokenizers library's Tokenizer.save) or bytes")


def tokenizer_from_string(saved: str):
    """The tokenizer a checkpoint carries (Tokenizer.to_str())."""
    return ByteTokenizer() if saved == "bytes" else HFTokenizer(saved, "the checkpoint's tokenizer")


def model_vocab_size(tokenizer) -> int:
    """The tokenizer's vocabulary rounded up to a multiple of 64, which GEMMs prefer."""
    return -(-tokenizer.vocab_size // 64) * 64


def check_vocab_size(tokenizer, vocab_size: int) -> str | None:
    """Refuses a model.vocab_size smaller than the tokenizer's vocabulary (its largest id + 1); a note
    where a tenth of its rows or more (128 at least) would never be used: rows past the tokenizer's
    ids (a habit from another tokenizer, 50,304 for bytes), or ids between that no token has."""
    rounded = model_vocab_size(tokenizer)
    fits = f"model.vocab_size={rounded} (its size rounded up to a multiple of 64)"
    gap = tokenizer.vocab_size - tokenizer.n_tokens  # ids that no token has, below the largest
    ids = (f"{tokenizer.vocab_size:,} ids ({tokenizer.n_tokens:,} tokens, the largest id {tokenizer.vocab_size - 1:,})"
           if gap else f"{tokenizer.vocab_size:,} tokens")
    if vocab_size < tokenizer.vocab_size:
        raise TokenizerError(f"model.vocab_size {vocab_size} is smaller than the {ids} of dataset.tokenizer "
                             f"{tokenizer.name}; set {fits}")
    notes = []
    unused = vocab_size - tokenizer.vocab_size
    if vocab_size > rounded and unused >= max(128, vocab_size / 10):  # (rounded up to 128 instead: quiet)
        notes.append(f"model.vocab_size {vocab_size:,} is larger than the {ids} of dataset.tokenizer "
                     f"{tokenizer.name}: {unused:,} rows of the embedding and of lm_head are never trained, and cost "
                     f"memory and time; {fits} fits it")
    if gap >= max(128, tokenizer.vocab_size / 10):
        notes.append(f"dataset.tokenizer {tokenizer.name} has {tokenizer.n_tokens:,} tokens, with ids up to "
                     f"{tokenizer.vocab_size - 1:,}: the {gap:,} ids between that no token has take rows of the "
                     f"embedding and of lm_head that are never trained, and cost memory and time (renumbering its "
                     f"tokens closes the gap)")
    return f"note: {'; '.join(notes)}" if notes else None


def lost_text(tokenizer, texts) -> str | None:
    """A warning if the tokenizer does not give a text back (decode(encode(text)) differs): it
    normalizes, drops spaces or line ends, or has no token for some characters. The model then
    trains on what it keeps, and generates that. Bytes and byte-level BPEs keep everything."""
    for text in texts:
        if change := text_change(tokenizer, text):
            fix = byte_level_fix(tokenizer)
            return (f"WARNING: dataset.tokenizer {tokenizer.name} does not give the text back: {change}; the model "
                    f"trains on (and writes) what it keeps, and bits per byte counts the bytes it gives back (compare "
                    f"them between runs of this tokenizer only). "
                    + (f"It is a byte-level BPE, which keeps every byte once {fix}" if fix else
                       "A byte-level BPE (python prepare.py --train-tokenizer) keeps every byte"))
    return None


def byte_level_fix(tokenizer) -> str | None:
    """What makes a byte-level BPE give its text back: a ByteLevel decoder, and no space added in front
    of each text; None where it is no byte-level BPE, or nothing of these is wrong."""
    if isinstance(tokenizer, ByteTokenizer):
        return None
    spec = json.loads(tokenizer.json)
    pre_tokenizer = spec.get("pre_tokenizer") or {}
    byte_level = [p for p in pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if p.get("type") == "ByteLevel"]
    if not byte_level:
        return None
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return "it has a ByteLevel decoder (tokenizer.decoder = tokenizers.decoders.ByteLevel(), then save it)"
    if any(p.get("add_prefix_space") for p in byte_level):
        return "its ByteLevel pre-tokenizer's add_prefix_space is false (it puts a space before each text)"
    return None


def separator_in_text(tokenizer) -> str | None:
    """A note where the text "<|endoftext|>" encodes to the separator: such text in a document cuts
    it, as at a document boundary."""
    for text in (SEPARATOR_TOKEN, f"a {SEPARATOR_TOKEN} b", f"a{SEPARATOR_TOKEN}b"):
        if tokenizer.separator in tokenizer.encode(text):
            return (f"note: dataset.tokenizer {tokenizer.name} encodes the text {SEPARATOR_TOKEN} as its document "
                    f"separator (id {tokenizer.separator}), which its vocabulary holds as an ordinary token too: a "
                    f"document that contains that text is cut there; a tokenizer from python prepare.py "
                    f"--train-tokenizer keeps it as text")
    return None


def text_change(tokenizer, text: str, context: int = 24) -> str | None:
    """Where decode(encode(text)) first differs from text: "'...' comes back as '...'", or None."""
    back = tokenizer.decode(tokenizer.encode(text))
    if back == text:
        return None
    at = next((i for i, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
    start = max(0, at - context // 2)
    return f"{text[start:start + context]!r} comes back as {back[start:start + context]!r}"


def note_prompt_change(tokenizer, prompt: str):
    """A note on stderr where the model's tokenizer does not give the prompt back (sample.py, neurons.py)."""
    if change := text_change(tokenizer, prompt):
        print(f"note: the model's tokenizer does not give the prompt back: {change}; the model reads what it keeps",
              file=sys.stderr)
    if (n := tokenizer.encode(prompt).count(tokenizer.separator)) > 0:
        what = "NUL character" if isinstance(tokenizer, ByteTokenizer) else SEPARATOR_TOKEN
        every_other = max(prompt[0::2].count("\0"), prompt[1::2].count("\0"))  # UTF-16's high or low bytes
        utf16 = ("; NULs between the characters are what UTF-16 without a byte-order mark reads as: save the text as "
                 "UTF-8" * (len(prompt) >= 4 and every_other >= 0.45 * len(prompt)))
        these = f"{n:,} {what}s are" if n > 1 else f"{what} is"
        print(f"note: the prompt's {these} the model's document separator: the model reads a document boundary "
              f"there{utf16}", file=sys.stderr)


def train_bpe(texts, vocab_size: int) -> str:
    """A byte-level BPE of vocab_size tokens (the 256 bytes, <|endoftext|>, merges) trained on
    the texts (an iterator of strings); returns its tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SEPARATOR_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()
