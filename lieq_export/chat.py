"""`lieq-export chat BUNDLE`: an interactive terminal chat with an exported bundle.

.pte bundles run through ExecuTorch's C++ `TextLLMRunner` (the runner the phone apps
use), ONNX bundles through onnxruntime (`backends.onnx.OnnxDecoder`). Tokens are printed
as they arrive; after each answer one line gives the token count and tokens/s.

With a chat template (the bundle's `chat_template.jinja` or `tokenizer_config.json`, or
`--chat-template FILE`) the whole conversation is rendered and re-run every turn (the KV
cache is reset; the oldest turns are dropped when the context is full). Without one,
each line is completed on its own, like `lieq-export generate`.

Ctrl-D (end of input) and Ctrl-C end the session with exit status 0 and no traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PROMPT = "you> "
ANSWER = "model> "


class ChatError(ValueError):
    """A bundle the chat cannot run (reported by the CLI as a clean error)."""


@dataclass
class Answer:
    text: str
    tokens: int  # tokens sampled for the answer (incl. a final end-of-sequence token)
    seconds: float  # from the call to the last token
    first_token_s: float | None = None
    stopped: bool = False  # interrupted by Ctrl-C


def stats_line(a: Answer) -> str:
    rate = a.tokens / a.seconds if a.seconds > 0 else float("inf")
    first = f", first token {a.first_token_s * 1000:.0f} ms" if a.first_token_s is not None else ""
    return f"[{a.tokens} tokens in {a.seconds:.2f} s, {rate:.1f} tok/s{first}]"


# ---------------------------------------------------------------------------------------
# Bundle kinds and chat templates
# ---------------------------------------------------------------------------------------


def bundle_kind(bundle: Path) -> str:
    if (bundle / "model.pte").is_file():
        return "pte"
    if (bundle / "model.onnx").is_file():
        return "onnx"
    raise ChatError(f"{bundle} is not a lieq-export bundle (no model.pte or model.onnx)")


def find_chat_template(bundle: Path, manifest: dict) -> str | None:
    """The bundle's chat template, else its source checkpoint's (pte bundles carry none)."""
    folders = [bundle]
    src = manifest.get("source_checkpoint")
    if src:
        folders.append(Path(src))
    for d in folders:
        with contextlib.suppress(OSError):
            jinja = d / "chat_template.jinja"
            if jinja.is_file():
                return jinja.read_text()
            cfg = d / "tokenizer_config.json"
            if cfg.is_file():
                t = json.loads(cfg.read_text()).get("chat_template")
                if isinstance(t, str) and t:
                    return t
    return None


class Renderer:
    """Renders the conversation with a Hugging Face chat template (jinja, via transformers)."""

    def __init__(self, tokenizer_json: Path, template: str, bos: str | None, eos: str | None):
        from transformers import PreTrainedTokenizerFast

        kw = {}
        if bos:
            kw["bos_token"] = bos
        if eos:
            kw["eos_token"] = eos
        self.tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), **kw)
        self.tok.chat_template = template

    def __call__(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------
# Engines: one answer for one prompt text, streamed through `emit`
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _native_output_silenced(verbose: bool):
    """The C++ runner prints the generated text and its logs on fds 1/2 itself: park
    them on /dev/null while it runs (our own output goes through a duplicate of fd 1)."""
    if verbose:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


class PteEngine:
    """ExecuTorch's TextLLMRunner (C++), as in `backends.pte.runner_generate`."""

    def __init__(self, bundle: Path, manifest: dict, *, temperature: float, verbose: bool):
        from .backends.pte import load_runtime_ops

        self.verbose = verbose
        self.temperature = temperature
        self.context = int(manifest.get("max_context_len") or manifest.get("max_seq_len") or 0)
        with _native_output_silenced(verbose):
            load_runtime_ops()
            from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
            from tokenizers import Tokenizer

            self._config = GenerationConfig
            self.runner = TextLLMRunner(str(bundle / "model.pte"), str(bundle / "tokenizer.json"))
        self.tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False).ids)

    def answer(self, text: str, max_new_tokens: int, emit: Callable[[str], None]) -> Answer:
        cfg = self._config(echo=False, max_new_tokens=max_new_tokens, temperature=self.temperature)
        pieces: list[str] = []
        stats: dict = {}
        first: list[float] = []
        interrupted: list[bool] = []
        t0 = time.perf_counter()

        def on_token(piece: str) -> None:
            if not first:
                first.append(time.perf_counter() - t0)
            pieces.append(piece)
            emit(piece)

        def on_stats(s) -> None:
            with contextlib.suppress(Exception):
                stats.update(json.loads(s.to_json_string()))

        def on_sigint(signum, frame):  # runs in the token callback; stop the C++ loop cleanly
            interrupted.append(True)
            self.runner.stop()

        self.runner.reset()  # the conversation is re-rendered in full every turn
        old = signal.signal(signal.SIGINT, on_sigint)
        try:
            with _native_output_silenced(self.verbose):
                self.runner.generate(text, cfg, on_token, on_stats)
        finally:
            signal.signal(signal.SIGINT, old)
        seconds = time.perf_counter() - t0
        # generated_tokens counts decode steps after the token the prefill sampled
        n = int(stats["generated_tokens"]) + 1 if "generated_tokens" in stats else len(pieces)
        return Answer("".join(pieces), n, seconds, first[0] if first else None, bool(interrupted))


class OnnxEngine:
    """onnxruntime with the bundle's KV-cache decoder (`backends.onnx.OnnxDecoder`)."""

    def __init__(self, bundle: Path, manifest: dict, *, temperature: float, top_p: float | None, verbose: bool):
        from tokenizers import Tokenizer

        from .backends.onnx import OnnxDecoder

        self.dec = OnnxDecoder(bundle)
        self.tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
        self.context = int(manifest.get("max_length") or 0)
        self.eos = manifest.get("eos_token_id")
        self.temperature, self.top_p = temperature, top_p
        self.templated = False  # set by the session: rendered text carries its own BOS

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=not self.templated).ids)

    def answer(self, text: str, max_new_tokens: int, emit: Callable[[str], None]) -> Answer:
        ids = self.tok.encode(text, add_special_tokens=not self.templated).ids
        if not ids:
            raise ChatError("the prompt encodes to no tokens")
        eos = set(self.eos if isinstance(self.eos, list) else [self.eos]) - {None}
        new: list[int] = []
        shown = [""]
        first: list[float] = []
        t0 = time.perf_counter()

        def on_token(t: int) -> None:
            if not first:
                first.append(time.perf_counter() - t0)
            new.append(int(t))
            s = self.tok.decode([x for x in new if x not in eos], skip_special_tokens=True)
            if s.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                return
            if s.startswith(shown[0]):
                emit(s[len(shown[0]):])
            shown[0] = s

        top_p = self.top_p if self.temperature > 0 else None
        self.dec.greedy(ids, max_new_tokens, eos_token_id=self.eos, on_token=on_token, top_p=top_p,
                        temperature=self.temperature or 1.0)
        seconds = time.perf_counter() - t0
        text_out = self.tok.decode([x for x in new if x not in eos], skip_special_tokens=True)
        if text_out.startswith(shown[0]) and len(text_out) > len(shown[0]):
            emit(text_out[len(shown[0]):])
        return Answer(text_out, len(new), seconds, first[0] if first else None)


# ---------------------------------------------------------------------------------------
# The session
# ---------------------------------------------------------------------------------------


@dataclass
class Session:
    engine: object
    render: Renderer | None
    max_new_tokens: int
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    def prompt_for(self, user: str) -> str:
        if self.render is None:
            return user
        turns = self.history + [{"role": "user", "content": user}]
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        while True:
            text = self.render(sys_msg + turns)
            ctx = getattr(self.engine, "context", 0)
            if not ctx or len(turns) <= 1 or self.engine.count(text) + self.max_new_tokens <= ctx:
                return text
            turns = turns[2:]  # drop the oldest user/assistant pair

    def budget(self, text: str) -> int:
        ctx = getattr(self.engine, "context", 0)
        if not ctx:
            return self.max_new_tokens
        room = ctx - self.engine.count(text) - 1
        if room <= 0:
            raise ChatError(f"the prompt does not fit the bundle's context of {ctx} tokens")
        return min(self.max_new_tokens, room)

    def turn(self, user: str, out) -> Answer:
        text = self.prompt_for(user)

        def emit(piece: str) -> None:
            out.write(piece)
            out.flush()

        a = self.engine.answer(text, self.budget(text), emit)
        if self.render is not None and not a.stopped:
            self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": a.text.strip()}]
        return a


def _token_text(tokenizer_json: Path, token_id) -> str | None:
    if token_id is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json)).id_to_token(int(token_id))


def open_session(bundle, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float | None = None,
                 chat_template: str | None = None, no_template: bool = False, system: str | None = None,
                 verbose: bool = False) -> tuple[Session, str]:
    """(session, banner) for a bundle folder."""
    b = Path(bundle)
    kind = bundle_kind(b)
    mpath = b / "manifest.json"
    if not mpath.is_file():
        raise ChatError(f"{b} has no manifest.json")
    manifest = json.loads(mpath.read_text())
    if not (b / "tokenizer.json").is_file():
        raise ChatError(f"{b} has no tokenizer.json")
    if kind == "pte":
        if top_p is not None:
            raise ChatError("--top-p is not available for .pte bundles (TextLLMRunner samples by temperature)")
        engine = PteEngine(b, manifest, temperature=temperature, verbose=verbose)
        bos, eos = manifest.get("bos_id"), (manifest.get("eos_ids") or [None])[0]
    else:
        engine = OnnxEngine(b, manifest, temperature=temperature, top_p=top_p, verbose=verbose)
        bos, eos = manifest.get("bos_token_id"), manifest.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
    template = None
    if not no_template:
        template = Path(chat_template).read_text() if chat_template else find_chat_template(b, manifest)
    render = None
    if template:
        tj = b / "tokenizer.json"
        render = Renderer(tj, template, _token_text(tj, bos), _token_text(tj, eos))
        if kind == "onnx":
            engine.templated = True
    session = Session(engine, render, max_new_tokens, system)
    ctx = getattr(engine, "context", 0)
    runtime = "ExecuTorch TextLLMRunner" if kind == "pte" else "onnxruntime"
    banner = (f"{b.name}: {kind} bundle on {runtime}, context {ctx} tokens, "
              + ("chat template" if render else "no chat template (each line is completed on its own)")
              + ". Ctrl-D or Ctrl-C to quit.")
    return session, banner


def run_chat(bundle, *, stdin=None, stdout=None, **kw) -> int:
    """The interactive loop. Returns the exit status (0 on end of input and on Ctrl-C)."""
    stdin = stdin or sys.stdin
    if stdout is None:
        # our own handle on the terminal: fd 1 itself is parked on /dev/null while the
        # C++ runner works (it prints the text it generates by itself)
        sys.stdout.flush()
        stdout = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", errors="replace")
    out = stdout
    try:
        # Started from a non-interactive shell's background job, a process inherits SIGINT
        # ignored, and Python then installs no KeyboardInterrupt handler: Ctrl-C would do
        # nothing. A chat promises Ctrl-C quits, so ask for it explicitly.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        session, banner = open_session(bundle, **kw)
        print(banner, file=out, flush=True)
        interactive = stdin.isatty()
        while True:
            if interactive and stdin is sys.stdin:
                try:
                    import readline  # noqa: F401  (line editing for input())
                except ImportError:
                    pass
                line = input(PROMPT)
            else:
                out.write(PROMPT)
                out.flush()
                line = stdin.readline()
                if not line:
                    raise EOFError
                line = line.rstrip("\n")
            if not line.strip():
                continue
            out.write(ANSWER)
            out.flush()
            a = session.turn(line, out)
            out.write("\n" + stats_line(a) + "\n")
            out.flush()
            if a.stopped:
                raise KeyboardInterrupt
    except EOFError:
        out.write("\n")
        out.flush()
        return 0
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            out.write("\n")
            out.flush()
        return 0


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def cmd_chat(args) -> int:
    return run_chat(args.bundle, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    chat_template=args.chat_template, no_template=args.no_template, system=args.system,
                    verbose=args.verbose)


def add_chat_parser(sub) -> None:
    """The `chat` subcommand (registered by lieq_export.cli.build_parser)."""
    p = sub.add_parser("chat", help="interactive terminal chat with a bundle (.pte via TextLLMRunner, or ONNX)")
    p.add_argument("bundle", help="bundle folder written by `lieq-export export`")
    p.add_argument("--max-new-tokens", type=int, default=256, help="per answer (default 256; capped by the context)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None, help="ONNX bundles: nucleus sampling, with --temperature > 0")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="jinja chat template to use instead of the bundle's")
    p.add_argument("--no-template", action="store_true", help="complete each line on its own, even with a template")
    p.add_argument("--system", default=None, help="system message (with a chat template)")
    p.add_argument("--verbose", action="store_true", help="show the ExecuTorch runtime's own output and logs")
    p.set_defaults(func=cmd_chat)
