"""Checks of a tokenizer against the model it feeds and the data it tokenizes, made before
anything is compiled or trained, each failing with a message that names the fix."""

from __future__ import annotations


def max_token_id(tokenizer) -> int:
    """The largest id `tokenizer` can emit: its vocabulary, added and special tokens included."""
    ids = [*tokenizer.get_vocab().values(), *tokenizer.added_tokens_decoder,
           *(i for i in tokenizer.all_special_ids if i is not None)]
    return max(ids)


def chat_template_error(tokenizer, what: str) -> ValueError:
    """The error for conversational data (`what`) and a tokenizer without a chat template."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return ValueError(f"{what} need a chat template, but the tokenizer {name!r} has none: set "
                      "tokenizer.chat_template (the model's own template, or "
                      "alignax.data.tokenizer.CHAT_TEMPLATE), or load the model's "
                      "instruct/chat tokenizer")


def check_tokenizer(tokenizer, *, vocab_size: int, needs_chat_template: bool = False) -> None:
    """Checks that `tokenizer` can feed a model whose embedding has `vocab_size` rows.

    Every id the tokenizer can emit (specials included) must be < vocab_size: a larger id indexes
    past the embedding table, which gives NaN logits and then a non-finite loss that says nothing
    about token ids. A model's vocabulary may be larger than its tokenizer's (padded embeddings).
    The tokenizer needs a pad token (batches are padded), and a chat template when the data is
    conversational (`needs_chat_template`).

    Raises:
      ValueError: naming both sizes, the missing pad token, or the missing chat template.

    >>> from alignax.data import default_tokenizer
    >>> check_tokenizer(default_tokenizer(), vocab_size=1024)
    >>> check_tokenizer(default_tokenizer(), vocab_size=1000)
    Traceback (most recent call last):
    ValueError: the tokenizer emits token ids up to 1023 (1024 tokens, specials included) but the model's vocabulary has 1000 entries (vocab_size=1000): ids >= 1000 would index past the embedding table (NaN logits). Use the model's own tokenizer, or a model with vocab_size >= 1024.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    largest = max_token_id(tokenizer)
    if largest >= vocab_size:
        raise ValueError(f"the tokenizer emits token ids up to {largest} ({len(tokenizer)} tokens, "
                         f"specials included) but the model's vocabulary has {vocab_size} entries "
                         f"(vocab_size={vocab_size}): ids >= {vocab_size} would index past the "
                         "embedding table (NaN logits). Use the model's own tokenizer, or a model "
                         f"with vocab_size >= {largest + 1}.")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set one before batching, e.g. "
                         "tokenizer.pad_token = tokenizer.eos_token")
    if needs_chat_template and getattr(tokenizer, "chat_template", None) is None:
        raise chat_template_error(tokenizer, "conversational records")
