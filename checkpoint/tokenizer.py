"""The tokenizer: tokenizer.json through the `tokenizers` package, plus what tokenizer_config.json and
generation_config.json say (chat template, EOS ids, mask token). User text never becomes special tokens."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from checkpoint.folder import MAX_JSON_BYTES, CheckpointError, inside_file, first_line, is_int, read_bytes, read_json
from checkpoint.config import LLADA2_MASK_ID
from checkpoint.sandbox import MAX_TEMPLATE_CHARS, render_template
from model import ModelConfig


# generation_config.json say (chat template, EOS ids, mask token).

CHATML = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
PLACEHOLDER = "\uE000prompt\uE000"  # private-use characters: no template or prompt text spells them


def _text_only(tok):
    """A copy of a `tokenizers` Tokenizer that never matches an added token: all of them are marked special,
    and special tokens are encoded as the text they spell (encode_special_tokens)."""
    from tokenizers import Tokenizer as HFTokenizer
    spec = json.loads(tok.to_str())
    for added in spec.get("added_tokens", []):
        added["special"] = True
    plain = HFTokenizer.from_str(json.dumps(spec))
    plain.encode_special_tokens = True
    return plain


def _token_ids(value, where: str, vocab_size: int, mask_id: int | None = None) -> list[int]:
    """An id field (one id or a list of them) checked against the vocabulary and the mask token."""
    ids = value if isinstance(value, list) else [value]
    if not ids or not all(is_int(i) and 0 <= i < vocab_size for i in ids):  # []: no sequence would ever end
        raise CheckpointError(f"{where} must be a token id (or a list of them) below vocab_size {vocab_size}, "
                              f"got {value!r}; fix the file")
    if mask_id is not None and mask_id in ids:
        raise CheckpointError(f"{where} {value!r} includes the mask token {mask_id}; a sequence would end at "
                              "every unmasked slot: fix the file")
    return ids


class Tokenizer:
    def __init__(self, folder: Path, cfg: ModelConfig):
        from tokenizers import Tokenizer as HFTokenizer
        folder = Path(folder).resolve()
        path = inside_file(folder, "tokenizer.json")
        try:
            self.tok = HFTokenizer.from_str(read_bytes(path, MAX_JSON_BYTES).decode("utf-8-sig"))  # as read_json
        except CheckpointError:
            raise
        except Exception as e:  # the tokenizers package's own errors, bad UTF-8, a nesting too deep
            raise CheckpointError(f"{path} cannot be read ({first_line(e)})") from None
        self.tok.no_truncation()  # settings some tokenizer.json files keep from a call that asked for them: a
        self.tok.no_padding()     # prompt is never cut or padded (transformers applies them only when asked)
        top = max(self.tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1], default=None)
        if top is not None and top[1] >= cfg.vocab_size:
            raise CheckpointError(f"tokenizer.json: token {top[0]!r} has id {top[1]}, beyond the model's vocabulary "
                                  f"(vocab_size {cfg.vocab_size} in config.json); the files do not belong together")
        tok_cfg = read_json(folder, "tokenizer_config.json", required=False)
        gen_cfg = read_json(folder, "generation_config.json", required=False)
        self.chat_template, self.template_source = self._template(folder, tok_cfg)
        self.enable_thinking = False  # Qwen3-style templates: no thinking block unless asked for
        self.plain = _text_only(self.tok)
        self.mask_id = self._mask_id(cfg, tok_cfg, gen_cfg)
        if not 0 <= self.mask_id < cfg.vocab_size:
            raise CheckpointError(f"mask token id {self.mask_id} is outside the vocabulary (vocab_size "
                                  f"{cfg.vocab_size}); fix mask_token_id in config.json or generation_config.json")
        if gen_cfg.get("eos_token_id") is not None:
            eos = _token_ids(gen_cfg["eos_token_id"], "generation_config.json: eos_token_id", cfg.vocab_size,
                             self.mask_id)
        elif cfg.eos_token_id is not None:
            eos = _token_ids(cfg.eos_token_id, "config.json: eos_token_id", cfg.vocab_size, self.mask_id)
        else:
            name = tok_cfg.get("eos_token")
            name = name.get("content") if isinstance(name, dict) else name
            found = self.tok.token_to_id(name) if isinstance(name, str) else None
            eos = [] if found is None else _token_ids(found, f"tokenizer_config.json: eos_token {name!r}",
                                                      cfg.vocab_size, self.mask_id)
        if cfg.eos_token_id is not None:  # checked even where generation_config.json's ids win
            _token_ids(cfg.eos_token_id, "config.json: eos_token_id", cfg.vocab_size, self.mask_id)
        self.eos_ids = sorted(set(eos))
        bos = tok_cfg.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        self.bos_token = bos if isinstance(bos, str) else None
        self._pieces = {}  # the chat template rendered once per enable_thinking

    @staticmethod
    def _template(folder: Path, tok_cfg: dict) -> tuple[str | None, str]:
        """The chat template and where it comes from: chat_template.jinja wins, as in transformers."""
        jinja_file = inside_file(folder, "chat_template.jinja", required=False)
        if jinja_file is not None:
            try:
                return read_bytes(jinja_file, MAX_TEMPLATE_CHARS).decode("utf-8"), "chat_template.jinja"
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{jinja_file} is not UTF-8 text ({e.reason})") from None
        source = "tokenizer_config.json (chat_template)"
        template = tok_cfg.get("chat_template")
        if isinstance(template, list):  # some checkpoints keep named templates
            if not all(isinstance(t, dict) for t in template):
                raise CheckpointError(f"{source} must be a string or a list of {{\"name\", \"template\"}} objects")
            names = [t.get("name") for t in template]
            if "default" not in names:  # as transformers: no silent fallback to ChatML
                raise CheckpointError(f"{source} names no \"default\" template (only {names}); fix the file")
            if names.count("default") > 1:  # transformers keeps the last, a first-wins reader the first
                raise CheckpointError(f"{source} names the \"default\" template twice; keep one")
            template = template[names.index("default")].get("template")
            if not isinstance(template, str):  # None would be ChatML without a word
                raise CheckpointError(f"{source}: the \"default\" template's \"template\" must be a string, got "
                                      f"{template!r}; fix the file")
        if template is not None and not isinstance(template, str):
            raise CheckpointError(f"{source} must be a string, not {type(template).__name__}; fix the file")
        if template is not None and len(template) > MAX_TEMPLATE_CHARS:
            raise CheckpointError(f"{source} is longer than {MAX_TEMPLATE_CHARS:,} characters; fix the file")
        return template, source

    def _mask_id(self, cfg, tok_cfg, gen_cfg) -> int:
        if cfg.mask_token_id is not None:
            return cfg.mask_token_id
        v = gen_cfg.get("mask_token_id")
        if v is not None:
            if not (is_int(v) and 0 <= v < cfg.vocab_size):
                raise CheckpointError(f"generation_config.json: mask_token_id must be a token id below vocab_size "
                                      f"{cfg.vocab_size}, got {v!r}; fix the file")
            return v
        if cfg.model_type == "llada2_moe":  # its own convention, before any guess by name
            return LLADA2_MASK_ID
        given = tok_cfg.get("mask_token")
        name = given.get("content") if isinstance(given, dict) else given
        if given is not None and not (isinstance(name, str) and self.tok.token_to_id(name) is not None):
            # a name the tokenizer lacks: not a guess (<|MASK|>) in its place
            raise CheckpointError(f"tokenizer_config.json: mask_token {given!r} is not a token of tokenizer.json; "
                                  "fix the file or set mask_token_id in config.json")
        for candidate in (name, "<|MASK|>"):
            if isinstance(candidate, str) and candidate and self.tok.token_to_id(candidate) is not None:
                return self.tok.token_to_id(candidate)
        raise CheckpointError("no mask token: set mask_token_id in config.json or mask_token in tokenizer_config.json")

    def encode(self, text: str) -> list[int]:
        """Control text: special tokens spelled in it (`<|im_end|>`) become those tokens. Not for user text."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """User text: a special token spelled in it stays plain text, so a prompt cannot close its own turn,
        open an assistant turn or plant mask slots."""
        return self.plain.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, prompt: str, chat: bool) -> list[int]:
        """A prompt's ids: with chat, the template's own markers are special tokens and the prompt is text."""
        if not chat:
            return self.encode_text(prompt)
        before, after = self.template_pieces()
        return self.encode(before) + self.encode_text(prompt) + self.encode(after)

    def template_pieces(self) -> tuple[str, str]:
        """The chat template rendered around a placeholder and split there: the text before and after the
        user's message. Rendered once (per enable_thinking), not once per prompt."""
        if self.enable_thinking not in self._pieces:
            rendered = self.apply_chat_template(PLACEHOLDER)
            if rendered.count(PLACEHOLDER) != 1:
                raise CheckpointError(f"{self.template_source}: the chat template does not show the user's message "
                                      "once, as given; fix it or pass --no-chat")
            self._pieces[self.enable_thinking] = tuple(rendered.split(PLACEHOLDER))
        return self._pieces[self.enable_thinking]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, prompt: str) -> str:
        """One user turn plus the assistant header. Renders the checkpoint's own Jinja template when jinja2
        is installed (in a sandbox with bounds on time and size: the template comes with the checkpoint), with
        the variables such templates read: messages, add_generation_prompt, enable_thinking
        (self.enable_thinking, False unless set), bos_token, eos_token. Without jinja2: the ChatML format that
        Qwen/SDAR chat checkpoints use."""
        if self.chat_template is None:  # none given (an empty one is a template, and renders nothing)
            return CHATML.format(prompt=prompt)
        if importlib.util.find_spec("jinja2") is None:  # optional: without it, ChatML
            return CHATML.format(prompt=prompt)
        try:
            return render_template(self.chat_template, messages=[{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, enable_thinking=self.enable_thinking,
                                   bos_token=self.bos_token or "", eos_token="")
        except Exception as e:  # whatever the template does (MemoryError, RecursionError too): one line
            raise CheckpointError(f"{self.template_source}: the chat template cannot be rendered "
                                  f"({type(e).__name__}: {first_line(e)}); fix it or pass --no-chat") from None
