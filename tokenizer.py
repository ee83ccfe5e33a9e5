"""What a token is: the one place that turns text into token ids and back.

ByteTokenizer: the tokens are the UTF-8 bytes of the text (vocabulary 256), BDH's reference
choice. Each document is followed by the separator token (byte 0x00), which marks document
boundaries and starts generation when there is no prompt. Invalid UTF-8 in the data is taken byte
for byte; decoding replaces what is not valid UTF-8.
"""
import numpy as np
import pyarrow as pa


class ByteTokenizer:
    name = "bytes"
    vocab_size = 256
    separator = 0
    dtype = np.uint8  # of the token streams

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(t) for t in ids).decode("utf-8", errors="replace")

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
