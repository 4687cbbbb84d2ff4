"""The embedded default tokenizer: a byte-level BPE trained on a small bundled corpus.

It lets the demos and tests run with no download. `default_tokenizer()` loads the shipped
`default_tokenizer/tokenizer.json` (a few milliseconds, cached) and wraps it in a transformers
`PreTrainedTokenizerFast` with pad/bos/eos tokens, role markers and a chat template.
`train_default_tokenizer()` rebuilds that file from `default_tokenizer/corpus.txt`; a test checks
that the shipped file equals a fresh training run, so the vocabulary (which the embedded tiny
model's embedding rows are indexed by) can never drift silently.

Switching to a real model only means passing its tokenizer instead, e.g.
`transformers.AutoTokenizer.from_pretrained("EleutherAI/pythia-160m")`.
"""

from __future__ import annotations

import functools
import pathlib

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

_DIR = pathlib.Path(__file__).resolve().parent / "default_tokenizer"
CORPUS_PATH = _DIR / "corpus.txt"
TOKENIZER_PATH = _DIR / "tokenizer.json"

VOCAB_SIZE = 1024
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS)  # ids 0..5 in this order

# One turn per message: "<|role|>\n" + content, closed by the eos token after an assistant turn
# and by a newline otherwise. Rendering a prompt with add_generation_prompt=True yields a prefix
# of rendering the prompt followed by the assistant's answer, which is how the data pipeline
# splits a conversation into prompt and response text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_default_tokenizer(corpus_path: pathlib.Path | str = CORPUS_PATH, *,
                            vocab_size: int = VOCAB_SIZE) -> tokenizers.Tokenizer:
    """Trains the byte-level BPE of the embedded default on `corpus_path`.

    The 256 byte symbols are always in the alphabet, so every string encodes (no unknown token);
    the special tokens take ids 0..5 and a bos token is prepended when special tokens are added.
    """
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(corpus_path)], trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)])
    return tokenizer


@functools.cache
def _shipped_tokenizer_json() -> str:
    return TOKENIZER_PATH.read_text(encoding="utf-8")


def default_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded default tokenizer (1024 tokens), built offline from the shipped files.

    A fresh object on each call (callers may mutate it, e.g. `padding_side`), from a cached file.

    >>> tok = default_tokenizer()
    >>> len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    (1024, 0, 1, 2)
    >>> tok.decode(tok("The film was great.")["input_ids"], skip_special_tokens=True)
    'The film was great.'
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(_shipped_tokenizer_json()),
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=512,
        padding_side="right",
        truncation_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
