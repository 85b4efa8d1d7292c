"""The tokenizer files of a Resources folder: vocab.json + merges.txt (CLIP BPE), and `added_tokens.json`
(token -> id) when the tokenizer has tokens beyond its vocabulary (textual-inversion embeddings).

Added tokens match as Hugging Face's do (tokenizers' AddedVocabulary, `normalized=True`): in the
normalized text (NFC, whitespace runs to one space, lower case), leftmost-longest, anywhere, before the
text is split into words; the Swift tokenizer does the same.
"""
import json
from pathlib import Path

from .errors import UserError

ADDED_TOKENS_FILE = "added_tokens.json"


def added_tokens(tokenizer) -> dict:
    """token -> id of the tokens a CLIP tokenizer adds to its BPE vocabulary (not the special ones)."""
    vocab_size = tokenizer.vocab_size
    return {str(tok.content if hasattr(tok, "content") else tok): int(i)
            for i, tok in sorted(tokenizer.added_tokens_decoder.items()) if i >= vocab_size}


def write_added_tokens(tokenizer, dest: Path) -> None:
    tokens = added_tokens(tokenizer)
    if tokens:
        (Path(dest) / ADDED_TOKENS_FILE).write_text(json.dumps(tokens, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")


def load_added_tokens(tokenizer, folder: Path):
    """Add the tokens of `folder/added_tokens.json` to a CLIP tokenizer made from its vocab.json and
    merges.txt, checking that each gets the id the file says."""
    path = Path(folder) / ADDED_TOKENS_FILE
    if not path.is_file():
        return tokenizer
    try:
        tokens = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(tokens, dict) or not all(isinstance(v, int) for v in tokens.values()):
            raise ValueError
    except (OSError, UnicodeDecodeError, ValueError):
        raise UserError(f"{path} is not a JSON object of token -> id; re-bundle the models") from None
    for token, token_id in sorted(tokens.items(), key=lambda item: item[1]):
        tokenizer.add_tokens(token)
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            raise UserError(f"{path}: token {token!r} has id {token_id}, but follows a vocabulary of another size; "
                            "re-bundle the models")
    return tokenizer
