"""`firebolt-vl chat`: a multi-turn terminal chat about an image, with tokens printed as they are generated.

    you> what is in the picture?
    assistant> a red circle ...
    you> /image other.png        (change the image: starts a new conversation, the model takes one image)
    you> /noimage  /reset  /help  /quit   (EOF, e.g. Ctrl-D or the end of piped input, quits too)

The image rides with the first user turn still in the history; when the conversation outgrows the prompt limit the
oldest turns are dropped (the image moves to the first remaining user turn). The same generator is used for the
whole session, so a session with a given --seed is reproducible.
"""

from __future__ import annotations

import sys
from typing import TextIO

import torch

from .engine import IncrementalText

HELP = ("commands: /image PATH (new image, new conversation)  /noimage  /reset (forget the conversation)  /help  "
        "/quit")


class PrintingStreamer:
    """The model's streamer protocol (put prompt ids, put new ids, end) printing text as soon as it is safe."""

    def __init__(self, tokenizer, out: TextIO, eos_ids: set[int]):
        self.text = IncrementalText(tokenizer)
        self.out, self.eos_ids = out, eos_ids
        self.prompt_seen = self.done = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        token = int(value.reshape(-1)[0])
        if self.done or token in self.eos_ids:
            self.done = True
            return
        piece = self.text.add(token)
        if piece:
            self.out.write(piece)
            self.out.flush()

    def end(self) -> None:
        self.out.write(self.text.flush())
        self.out.flush()


class ChatSession:
    """Conversation state and one `reply` per user turn (no terminal I/O except the streamed answer)."""

    def __init__(self, model, processor, image=None, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, max_prompt_tokens: int | None = None, system: str | None = None,
                 compile: str | None = None):
        self.model, self.processor = model, processor
        self.compile = compile  # generate(compile=...): static cache + compiled step
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        context = int(getattr(model.config.text_config, "max_position_embeddings", 0) or 0)
        limit = processor.max_prompt_tokens or (context - max_new_tokens if context else None)
        self.max_prompt_tokens = max_prompt_tokens or limit
        tc = model.config.text_config
        eos = tc.eos_token_id if tc.eos_token_id is not None else processor.tokenizer.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self.system = system
        self.turns: list[tuple[str, str]] = []  # (user, assistant)
        self.image = None
        self.image_name: str | None = None
        if image is not None:
            self.set_image(image)

    def set_image(self, source) -> None:
        """A new image (path, bytes or PIL) starts a new conversation; None removes the image."""
        from ..processing import load_image

        if source is None:
            self.image, self.image_name = None, None
        else:
            self.image = load_image(source, self.processor.max_image_pixels)
            self.image_name = str(source) if isinstance(source, str) else "image"
        self.turns = []

    def reset(self) -> None:
        self.turns = []

    def messages(self, user: str, turns: list[tuple[str, str]]) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for i, (u, a) in enumerate([*turns, (user, None)]):
            content = [{"type": "image"}, {"type": "text", "text": u}] if i == 0 and self.image is not None else u
            msgs.append({"role": "user", "content": content})
            if a is not None:
                msgs.append({"role": "assistant", "content": a})
        return msgs

    def inputs(self, user: str) -> dict:
        """Model inputs for the next turn, dropping the oldest turns while the prompt is over the limit."""
        turns = list(self.turns)
        while True:
            enc = self.processor(self.processor.chat_prompt(self.messages(user, turns)), images=self.image)
            n = enc["input_ids"].shape[1]
            if self.max_prompt_tokens is None or n <= self.max_prompt_tokens:
                return enc
            if not turns:
                raise ValueError(f"the message is {n} tokens, over the limit of {self.max_prompt_tokens}")
            turns.pop(0)

    @torch.no_grad()
    def reply(self, user: str, out: TextIO, prefix: str = "") -> str:
        """Answer `user`, streaming `prefix` and then the text to `out`; returns the answer and keeps the turn."""
        if not user.strip():
            raise ValueError("empty message")
        enc = {k: v.to(self.device) for k, v in self.inputs(user).items()}
        out.write(prefix)
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        streamer = PrintingStreamer(self.processor.tokenizer, out, self.eos_ids)
        self.model.generate(
            **enc,
            max_new_tokens=self.max_new_tokens,
            do_sample=self.temperature > 0,
            temperature=self.temperature if self.temperature > 0 else 1.0,
            top_p=self.top_p,
            generator=self.generator,
            streamer=streamer,
            compile=self.compile,
        )
        answer = streamer.text.text
        self.turns.append((user, answer))
        return answer


def run_chat(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None,
             stderr: TextIO | None = None, interactive: bool | None = None) -> int:
    """The read-answer loop (default streams: sys.stdin/stdout/stderr). Errors (a bad image path, a too-long message)
    are printed and the chat goes on. Returns 0 on /quit or end of input."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if interactive is None:
        interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        where = f" about {session.image_name}" if session.image_name else ""
        print(f"chatting{where}; {HELP}", file=stdout)
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                print(file=stdout)
                return 0
        else:
            line = stdin.readline()
            if not line:
                return 0
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                command, _, arg = line.partition(" ")
                arg = arg.strip()
                if command in ("/quit", "/exit", "/q"):
                    return 0
                if command == "/help":
                    print(HELP, file=stdout)
                elif command == "/reset":
                    session.reset()
                    print("(conversation cleared)", file=stdout)
                elif command == "/noimage":
                    session.set_image(None)
                    print("(no image; new conversation)", file=stdout)
                elif command == "/image":
                    if not arg:
                        print(f"(image: {session.image_name or 'none'})", file=stdout)
                    else:
                        session.set_image(arg)
                        print(f"(image: {arg}; new conversation)", file=stdout)
                else:
                    print(f"unknown command {command}; {HELP}", file=stdout)
                stdout.flush()
                continue
            session.reply(line, stdout, prefix="assistant> ")
            stdout.write("\n")
            stdout.flush()
        except (ValueError, OSError) as e:  # the user's to fix: say so and keep chatting
            stdout.flush()
            print(f"error: {e}", file=stderr)
            stderr.flush()
