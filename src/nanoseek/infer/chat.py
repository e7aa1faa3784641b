"""`nanoseek chat`: a terminal chat that shows the model's reasoning, then its answer.

The reasoning streams dimmed under a "thinking" header and closes with the seconds spent;
the answer follows (without its <answer> tags). The conversation is kept between turns
(without the reasoning, as DeepSeek's API asks) and rendered in the prompt format the model
was trained with: DeepSeek's chat turns, or R1-Zero's "User: ... Assistant: ..." lines
(nanoseek.data.chat). Ctrl-C while the model writes stops that answer and keeps the session.
"""

from __future__ import annotations

import contextlib
import time

from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams

HELP = "/reset starts over, /exit quits (or Ctrl-D); Ctrl-C stops an answer"


class ChatSession:
    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None):
        self.engine, self.params, self.system = engine, params, system
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, console) -> tuple[str, str] | None:
        """Stream the reply to `text`; None when it was stopped with Ctrl-C. The conversation is
        rendered in the model's own prompt format (its tokenizer's: chat or R1-Zero)."""
        messages = self.messages + [{"role": "user", "content": text}]
        start = time.perf_counter()
        thinking_since = None
        reasoning, answer = [], []
        output = None
        try:
            # the turns' control tokens from the template only: what is typed is ordinary text
            prompt = {"prompt_token_ids": self.engine.tokenizer.encode_chat(messages)}
            with contextlib.closing(self.engine.stream(prompt, self.params)) as events:
                for event in events:
                    if event.reasoning:
                        if thinking_since is None:
                            thinking_since = time.perf_counter()
                            console.print("thinking", style="bold dim")
                        reasoning.append(event.reasoning)
                        console.print(event.reasoning, style="dim", end="", markup=False, highlight=False)
                    if event.answer:
                        if not answer:
                            self._end_thinking(console, thinking_since)
                            thinking_since = None
                        answer.append(event.answer.lstrip() if not answer else event.answer)
                        console.print(answer[-1], end="", markup=False, highlight=False)
                    if event.output is not None:
                        output = event.output
        except KeyboardInterrupt:
            console.print("\n[yellow]stopped[/yellow] (the conversation so far is kept)")
            return None
        if not answer:
            self._end_thinking(console, thinking_since)
        took = time.perf_counter() - start
        tokens = len(output.token_ids) if output else 0
        note = f"{tokens} tokens, {took:.1f}s"
        if output is not None and output.finish_reason == "length":
            note += ", cut at the token limit"
        console.print(f"\n[dim]({note})[/dim]")
        final_reasoning, final_answer = (
            ("".join(reasoning), "".join(answer)) if output is None else (output.reasoning, output.answer)
        )
        self.messages = messages + [{"role": "assistant", "content": final_answer}]
        return final_reasoning, final_answer

    @staticmethod
    def _end_thinking(console, since: float | None) -> None:
        if since is not None:
            console.print(f"\n[dim]thought for {time.perf_counter() - since:.1f}s[/dim]\n")


def run_chat(engine: Engine, params: SamplingParams, system: str | None = None, console=None, read=input) -> int:
    from rich.console import Console

    console = console or Console()
    session = ChatSession(engine, params, system)
    console.print(f"[bold]nanoseek chat[/bold] [dim]({engine.tokenizer.prompt_format} format; {HELP})[/dim]")
    while True:
        try:
            text = read("you> ")
        except EOFError:
            console.print()
            return 0
        except KeyboardInterrupt:
            console.print(f"\n[dim]{HELP}[/dim]")
            continue
        text = text.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            console.print("[dim]new conversation[/dim]")
            continue
        session.reply(text, console)
