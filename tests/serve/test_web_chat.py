"""The web chat at GET / in headless Chromium (Playwright driving the Debian `chromium`): a
message streams its reasoning into a "Thought for N seconds" block and then its answer, the
conversation goes back without the reasoning, the default max tokens is what the context has
left, a failed turn is not kept, the stop button aborts the request, and the thinking switch
turns the reasoning off (`thinking: {"type": "disabled"}`).

`make test` installs chromium when it is missing; without it this test fails, never skips.
"""

import re
import shutil

import pytest

from nanoseek.infer import SamplingParams

from serve_support import MESSAGES, MODEL, engine_steps, expected_message, format_chat, serve_in_thread, wait_idle

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def server(model_dir):
    """The API and the page on uvicorn in a thread of this process, on a port of its own."""
    from nanoseek.infer import Engine

    with serve_in_thread(Engine.from_pretrained(model_dir, max_batch_size=4, max_seq_len=512)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[dev]'")
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: `make test` installs it (apt-get install -y chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1000, "height": 760})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server)
    yield page
    page.close()
    assert not errors, errors  # no JavaScript exception


COUNT_UPDATES = """() => {
  window.updates = {reasoning: 0, answer: 0};
  new MutationObserver((records) => {
    for (const r of records) {
      const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
      if (el.closest(".reasoning")) window.updates.reasoning++;
      if (el.closest(".answer")) window.updates.answer++;
    }
  }).observe(document.getElementById("messages"), {childList: true, subtree: true, characterData: true});
}"""


def test_chat_streams_the_reasoning_then_the_answer(page, server, engine, tmp_path):
    from playwright.sync_api import expect

    expect(page.locator("#model")).to_have_text(MODEL)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.fill("#thinking-budget", "10")
    page.evaluate(COUNT_UPDATES)
    page.fill("#input", MESSAGES[0]["content"])
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant").last
    expect(reply.locator(".meta")).to_contain_text("24 tokens (11 reasoning)", timeout=60_000)
    reasoning, answer, _ = expected_message(engine, MESSAGES, max_tokens=24, max_thinking_tokens=10)
    assert reply.locator(".reasoning").text_content() == reasoning
    assert reply.locator(".answer").text_content() == answer
    expect(reply.locator("details.thought summary")).to_have_text(re.compile(r"Thought for [0-9.]+ seconds?"))
    assert reply.locator("details.thought").get_attribute("open") is not None  # shown, and collapsible
    updates = page.evaluate("window.updates")
    assert updates["reasoning"] > 2 and updates["answer"] > 2, updates  # streamed piece by piece
    shot = tmp_path / "web-chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"\nscreenshot: {shot}")

    # The next turn sends the conversation back with the answer and without the reasoning.
    with page.expect_request("**/v1/chat/completions") as request:
        page.fill("#input", "and 5-2?")
        page.press("#input", "Enter")
    sent = request.value.post_data_json
    assert sent["messages"] == [
        MESSAGES[0],
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "and 5-2?"},
    ]
    assert sent["stream"] is True and sent["max_reasoning_tokens"] == 10 and sent["thinking"] == {"type": "enabled"}
    expect(page.locator(".msg.assistant .meta")).to_have_count(2, timeout=60_000)
    expect(page.locator(".msg.assistant").last.locator(".meta")).to_contain_text("tokens")


def test_default_max_tokens_is_what_the_context_has_left(page, server, engine):
    from playwright.sync_api import expect

    expect(page.locator("#model")).to_have_text(MODEL)
    assert page.input_value("#max-tokens") == ""  # blank: "auto"
    assert page.get_attribute("#max-tokens", "max") == "512"  # the server's max_model_len, from /v1/models
    page.fill("#temperature", "0")  # greedy: this random model never picks end-of-sequence
    page.fill("#thinking-budget", "8")
    with page.expect_request("**/v1/chat/completions") as request:
        page.fill("#input", MESSAGES[0]["content"])
        page.press("#input", "Enter")
    assert request.value.post_data_json["max_tokens"] is None  # the server fills the context
    prompt_tokens = len(engine.tokenizer.encode(format_chat(MESSAGES)))
    reply = page.locator(".msg.assistant").last
    expect(reply.locator(".meta")).to_contain_text(f"{512 - prompt_tokens} tokens (9 reasoning)", timeout=90_000)
    expect(reply.locator(".meta")).to_contain_text("cut at the token limit")
    expect(reply.locator(".error")).to_have_count(0)


def test_a_failed_turn_is_not_kept(page, server):
    from playwright.sync_api import expect

    expect(page.locator("#model")).to_have_text(MODEL)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "600")  # more than the 512-token context: the server answers 400
    page.fill("#input", "What is 1+1?")
    page.press("#input", "Enter")
    failed = page.locator(".msg.assistant").last
    expect(failed.locator(".error")).to_contain_text("not kept in the conversation")
    expect(failed.locator(".error")).to_contain_text("512")  # the server's own message: the context length
    expect(page.locator(".msg.failed")).to_have_count(2)  # the question and the failed reply, greyed out
    assert page.input_value("#input") == "What is 1+1?"  # handed back for another try
    expect(page.locator("#send")).to_be_enabled()

    page.fill("#max-tokens", "6")
    with page.expect_request("**/v1/chat/completions") as request:
        page.fill("#input", "What is 2+2?")
        page.press("#input", "Enter")
    assert request.value.post_data_json["messages"] == [{"role": "user", "content": "What is 2+2?"}]
    expect(page.locator(".msg.assistant").last.locator(".meta")).to_contain_text("6 tokens")
    expect(page.locator(".msg.assistant").last.locator(".error")).to_have_count(0)

    # ...and the successful turn is: the next request carries it.
    with page.expect_request("**/v1/chat/completions") as request:
        page.fill("#input", "and 3+3?")
        page.press("#input", "Enter")
    sent = [m["role"] for m in request.value.post_data_json["messages"]]
    assert sent == ["user", "assistant", "user"]
    expect(page.locator(".msg.assistant .meta")).to_have_count(3, timeout=60_000)


def test_stop_button_aborts_the_answer(page, server):
    from playwright.sync_api import expect

    expect(page.locator("#model")).to_have_text(MODEL)
    page.fill("#temperature", "0")  # greedy: it never picks end-of-sequence
    page.fill("#max-tokens", "480")  # no thinking budget: it would think for 480 tokens
    steps = engine_steps(server)
    page.fill("#input", "Tell me a long story")
    page.click("#send")
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator(".reasoning").last).not_to_be_empty(timeout=60_000)
    page.click("#stop")
    reply = page.locator(".msg.assistant").last
    expect(reply.locator(".meta")).to_contain_text("stopped")
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_enabled()
    wait_idle(server)
    assert engine_steps(server) - steps < 400  # the server aborted it, not ran it to its end


def test_a_server_with_an_api_key_asks_for_it_once(browser, model_dir):
    from playwright.sync_api import expect

    from nanoseek.infer import Engine

    with serve_in_thread(Engine.from_pretrained(model_dir, max_batch_size=2, max_seq_len=512), api_key="sk-web") as url:
        page = browser.new_page()
        asked = []
        page.on("dialog", lambda d: (asked.append(d.message), d.accept("sk-web")))
        page.goto(url)
        expect(page.locator("#model")).to_have_text(MODEL)  # /v1/models answered 401, then 200 with the key
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "6")
        page.fill("#input", "hi")
        page.press("#input", "Enter")
        expect(page.locator(".msg.assistant .meta")).to_contain_text("6 tokens")
        assert asked == ["This server needs an API key:"]  # kept in localStorage for the chat request
        page.close()


def test_thinking_switch_turns_the_reasoning_off(page, server, engine):
    from playwright.sync_api import expect

    expect(page.locator("#model")).to_have_text(MODEL)
    assert page.is_checked("#thinking")  # on by default
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "6")
    page.fill("#thinking-budget", "3")
    page.uncheck("#thinking")
    expect(page.locator("#thinking-budget")).to_be_disabled()  # no budget without thinking
    with page.expect_request("**/v1/chat/completions") as request:
        page.fill("#input", MESSAGES[0]["content"])
        page.press("#input", "Enter")
    sent = request.value.post_data_json
    assert sent["thinking"] == {"type": "disabled"} and sent["max_reasoning_tokens"] is None
    reply = page.locator(".msg.assistant").last
    expect(reply.locator(".meta")).to_contain_text("6 tokens (0 reasoning)", timeout=60_000)
    assert reply.locator("details.thought").is_hidden()  # nothing to show: no "Thought for" block
    ids = engine.tokenizer.encode_chat(MESSAGES, thinking=False)  # the turn opens with <think>\n\n</think>
    out = engine.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=6))[0].outputs[0]
    assert reply.locator(".answer").text_content() == out.answer and out.answer

    page.check("#thinking")  # and back on: the next turn thinks again, under its budget
    expect(page.locator("#thinking-budget")).to_be_enabled()
    with page.expect_request("**/v1/chat/completions") as request:
        page.fill("#input", "and 5-2?")
        page.press("#input", "Enter")
    sent = request.value.post_data_json
    assert sent["thinking"] == {"type": "enabled"} and sent["max_reasoning_tokens"] == 3
    reply = page.locator(".msg.assistant").last
    expect(reply.locator(".meta")).to_contain_text(re.compile(r"6 tokens \([1-9]\d* reasoning\)"), timeout=60_000)
    assert reply.locator("details.thought").is_visible()
