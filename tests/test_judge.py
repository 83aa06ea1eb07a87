"""Pairwise LLM judges against a stub OpenAI-compatible server on 127.0.0.1, and a tiny local causal LM."""

import json
import math
import socket
import threading
import time
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from bpo_lightning import judge as judge_module
from bpo_lightning.annotation import PairwiseAnnotator
from bpo_lightning.judge import DEFAULT_TEMPLATE, HTTPJudge, LocalJudge, _endpoint, _is_timeout, parse_verdict

KEY_ENV = "BPO_TEST_JUDGE_KEY"
SECRET = "sk-test-0123456789-secret"
NAN = math.nan


def counts(**nonzero) -> dict[str, int]:
    """A judge's full counter dict: the given counters, 0 for the others."""
    names = ("requests", "retries", "timeouts", "failures", "unparseable", "disagreements")
    return {**dict.fromkeys(names, 0), **nonzero}


def same(values, expected):
    """Element-wise equality that treats nan as equal to nan."""
    assert len(values) == len(expected), (values, expected)
    return all((math.isnan(v) and math.isnan(e)) or v == e for v, e in zip(values, expected, strict=True))


# --------------------------------------------------------------------------------------------------------------------
# Stub server
# --------------------------------------------------------------------------------------------------------------------


class StubState:
    """What the stub does (``mode``) and what it saw."""

    def __init__(self) -> None:
        self.mode = "good"
        self.fail_first = 0  # for "500_first" / "429_first"
        self.delay = 0.0  # seconds each request takes ("good" mode)
        self.calls = 0
        self.auth: list[str | None] = []
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.release = threading.Event()  # ends "hang" requests at teardown
        self.slow = threading.Event()  # prompts with SLOW wait for it (any mode but "hang")
        self.url = ""
        self.replied = 0  # replies sent (whole or not)
        self.answered: list[str] = []  # the judge prompts answered, whole replies sent
        self.dripped = 0  # bytes of the "drip" reply written before the client went away
        self.alive_for: int | None = None  # requests answered before the server dies (refusing connections)
        self.kill = lambda: None  # stops the server: its port refuses connections from then on


def good_answer(content: str) -> str:
    """Prefer the response containing GOOD (the default template's sections); garbage for prompts with GARBAGE."""
    prompt = content.split("[Prompt]\n", 1)[1].split("\n\n[Response A]", 1)[0]
    response_a = content.split("[Response A]\n", 1)[1].split("\n\n[Response B]", 1)[0]
    if "GARBAGE" in prompt:
        return "I cannot decide, both are fine."
    return "After careful thought.\nPreferred: A" if "GOOD" in response_a else "Preferred: **B**"


def make_handler(state: StubState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def send(self, status: int, payload: dict | str) -> None:
            self.done()  # the request stops counting as in flight before the client can see the answer
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            with state.lock:
                state.replied += 1
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            if status == 200:
                with state.lock:
                    state.answered.append(self.content)

        def drip(self, text: str) -> None:
            """A whole reply's headers at once, then its body one byte every 0.05 s."""
            data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for k in range(len(data)):
                    self.wfile.write(data[k : k + 1])
                    self.wfile.flush()
                    state.dripped = k + 1
                    time.sleep(0.05)
            except OSError:  # the client gave up
                return

        def reply(self, text: str) -> None:
            self.send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.content = body["messages"][0]["content"]
            with state.lock:
                state.calls += 1
                number = state.calls
                if state.alive_for is not None and number > state.alive_for:  # dead: no reply, no more connections
                    threading.Thread(target=state.kill, daemon=True).start()
                    self.close_connection = True
                    return
                state.auth.append(self.headers.get("Authorization"))
                state.bodies.append(body)
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            self.counted = True
            try:
                self.answer(body, number)
            finally:
                self.done()

        def done(self) -> None:
            with state.lock:
                if getattr(self, "counted", False):
                    state.in_flight -= 1
                    self.counted = False

        def answer(self, body: dict, number: int) -> None:
            content = body["messages"][0]["content"]
            mode = state.mode
            if self.path != "/v1/chat/completions":
                self.send(404, {"error": "no such route"})
            elif mode == "hang":
                state.release.wait(60.0)  # until the test ends
                self.reply("Preferred: A")
            elif mode == "drip":
                self.drip("Preferred: A")
            elif mode == "longer":  # prefers the longer response (A on a tie, so a tie disagrees)
                a = content.split("[Response A]\n", 1)[1].split("\n\n[Response B]", 1)[0]
                b = content.split("[Response B]\n", 1)[1].split("\n\nAnswer with", 1)[0]
                self.reply("Preferred: A" if len(a) >= len(b) else "Preferred: B")
            elif mode == "flip":  # a verdict that flips with every request, whatever the responses
                self.reply("Preferred: A" if number % 2 else "Preferred: B")
            elif "SLOW" in content:
                state.slow.wait(5.0)
                self.reply(good_answer(content))
            elif mode == "400":
                self.send(400, {"error": "unknown model"})
            elif mode == "echo_auth_400":
                self.send(400, {"error": f"bad credentials {self.headers.get('Authorization')}"})
            elif mode == "always500" or (mode == "500_first" and number <= state.fail_first) or "FAIL" in content:
                self.send(500, {"error": "internal"})
            elif mode == "429_first" and number <= state.fail_first:
                self.send(429, {"error": "slow down"})
            elif mode == "malformed":
                self.send(200, "this is not json")
            elif mode == "biased" or "BIASED" in content:
                self.reply("Preferred: A")
            else:
                time.sleep(state.delay)
                self.reply(good_answer(content))

    return Handler


def start_stub() -> tuple[StubState, callable]:
    """A stub server on 127.0.0.1 (its state), and the function that stops it."""
    state = StubState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # a client that gave up (timeout test) is not an error
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    stopped = threading.Lock()

    def stop() -> None:
        if stopped.acquire(blocking=False):
            server.shutdown()
            server.server_close()  # the port refuses connections from now on
            thread.join(timeout=2)

    state.kill = stop
    return state, stop


@pytest.fixture
def stub():
    state, stop = start_stub()
    yield state
    state.release.set()
    state.slow.set()
    stop()


@pytest.fixture
def make_judge(stub, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)

    def make(**kwargs) -> HTTPJudge:
        args = {"base_url": stub.url, "model": "judge-model", "api_key_env": KEY_ENV, "backoff": 0.0, "timeout": 5.0}
        return HTTPJudge(**{**args, **kwargs})

    return make


PROMPTS = ["Review the film.", "Review the book.", "Review the album."]
FIRST = ["GOOD: a fine film", "a dull book", "GOOD: a great album"]
SECOND = ["a dull film", "GOOD: a fine book", "a dull album"]


# --------------------------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A", 1.0),
        (" b\n", -1.0),
        ("Preferred: B", -1.0),
        ("I think A is better. Preferred: A", 1.0),
        ("preferred:b", -1.0),
        ("Preferred: **A**", 1.0),
        ('Preferred: "B".', -1.0),
        ("Preferred: Response B", -1.0),
        ("Let me think.\nPreferred: B\n", -1.0),
        ("Preferred: A\nOn reflection, Preferred: B", -1.0),
        ("Some reasoning here.\n\nA.", 1.0),
        ("I cannot decide.", NAN),
        ("Preferred: neither", NAN),
        ("Preferred: AB", NAN),
        ("Both A and B are good", NAN),
        ("", NAN),
        (None, NAN),
    ],
)
def test_parse_verdict(text, expected):
    assert same([parse_verdict(text)], [expected])


# --------------------------------------------------------------------------------------------------------------------
# HTTPJudge
# --------------------------------------------------------------------------------------------------------------------


def test_good_verdicts_both_orders_and_auth(stub, make_judge):
    judge = make_judge()
    assert isinstance(judge, PairwiseAnnotator)
    assert judge.compare(PROMPTS, FIRST, SECOND) == [1.0, -1.0, 1.0]
    assert judge.counts == counts(requests=6)
    assert stub.calls == 6
    assert stub.auth == [f"Bearer {SECRET}"] * 6
    body = stub.bodies[0]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0 and body["max_tokens"] == 16
    assert body["messages"][0]["role"] == "user"
    contents = sorted(b["messages"][0]["content"] for b in stub.bodies)
    pairs = list(zip(PROMPTS, FIRST, SECOND, strict=True))
    assert contents == sorted(
        [DEFAULT_TEMPLATE.format(prompt=p, response_a=a, response_b=b) for p, a, b in pairs]
        + [DEFAULT_TEMPLATE.format(prompt=p, response_a=b, response_b=a) for p, a, b in pairs]
    )
    assert judge.compare([], [], []) == []


def test_key_never_stored_or_named(stub, make_judge):
    judge = make_judge()
    judge.compare(PROMPTS[:1], FIRST[:1], SECOND[:1])
    loggable = [judge.identity, repr(judge), json.dumps(vars(judge), default=repr), str(judge.counts)]
    for text in loggable:
        assert SECRET not in text
    assert judge.identity.startswith("HTTPJudge:judge-model:template=")
    assert judge.identity.endswith(":both_orders=True")
    other = make_judge(template="{prompt} / {response_a} / {response_b}", both_orders=False)
    assert other.identity != judge.identity and other.identity.endswith(":both_orders=False")


def test_single_order(stub, make_judge):
    judge = make_judge(both_orders=False)
    assert judge.compare(PROMPTS, FIRST, SECOND) == [1.0, -1.0, 1.0]
    assert judge.counts["requests"] == 3 and stub.calls == 3


def test_garbage_is_unparseable_nan(stub, make_judge):
    judge = make_judge()
    out = judge.compare(["GARBAGE prompt", "Review it."], ["GOOD x", "y"], ["y", "GOOD x"])
    assert same(out, [NAN, -1.0])
    assert judge.counts == counts(requests=4, unparseable=2)


def test_position_bias_is_a_disagreement(stub, make_judge):
    stub.mode = "biased"
    judge = make_judge()
    assert same(judge.compare(PROMPTS[:2], FIRST[:2], SECOND[:2]), [NAN, NAN])
    assert judge.counts == counts(requests=4, disagreements=2)
    single = make_judge(both_orders=False)
    assert single.compare(PROMPTS[:2], FIRST[:2], SECOND[:2]) == [1.0, 1.0]  # one order cannot see the bias


@pytest.mark.parametrize("mode", ["500_first", "429_first"])
def test_transient_errors_are_retried(stub, make_judge, mode):
    stub.mode, stub.fail_first = mode, 2
    judge = make_judge(both_orders=False, max_retries=3, concurrency=1)
    assert judge.compare(PROMPTS, FIRST, SECOND) == [1.0, -1.0, 1.0]
    assert judge.counts == counts(requests=5, retries=2)
    assert stub.calls == 5


def test_backoff_is_exponential_and_capped(stub, make_judge, monkeypatch):
    delays = []
    monkeypatch.setattr(judge_module, "_pause", lambda seconds, stop: delays.append(seconds) or False)
    stub.mode, stub.fail_first = "500_first", 4
    judge = make_judge(both_orders=False, max_retries=4, backoff=0.5, max_backoff=1.5)
    assert judge.compare(PROMPTS[:1], FIRST[:1], SECOND[:1]) == [1.0]
    assert delays == [0.5, 1.0, 1.5, 1.5]


def test_dead_endpoint_raises_naming_url(stub, make_judge):
    stub.mode = "always500"
    judge = make_judge(max_retries=1)
    with pytest.raises(RuntimeError, match=stub.url) as info:
        judge.compare(PROMPTS[:1], FIRST[:1], SECOND[:1])
    assert "HTTP 500" in str(info.value) and SECRET not in str(info.value)
    assert judge.counts == counts(requests=4, retries=2, failures=2)


def test_partial_failure_gives_nan(stub, make_judge):
    judge = make_judge(max_retries=1)
    out = judge.compare(["Review it.", "FAIL here"], ["GOOD a", "GOOD b"], ["c", "d"])
    assert same(out, [1.0, NAN])
    assert judge.counts == counts(requests=6, retries=2, failures=2)


def test_timeout_is_not_retried_by_default(stub, make_judge):
    stub.mode = "hang"
    judge = make_judge(both_orders=False, timeout=0.2, max_retries=3)
    with pytest.raises(RuntimeError, match="timed out") as info:
        judge.compare(PROMPTS[:1], FIRST[:1], SECOND[:1])
    assert stub.replied == 0  # the judge gave up while the stub was still working on the answer
    assert stub.url in str(info.value) and "init_args.timeout" in str(info.value)
    assert judge.counts == counts(requests=1, timeouts=1, failures=1)
    assert stub.calls == 1  # the slow answer was not asked for (and paid) twice


def test_timeout_is_retried_when_configured(stub, make_judge):
    stub.mode = "hang"
    judge = make_judge(both_orders=False, timeout=0.2, max_retries=1, retry_timeouts=True)
    with pytest.raises(RuntimeError, match="timed out"):
        judge.compare(PROMPTS[:1], FIRST[:1], SECOND[:1])
    assert stub.replied == 0  # both attempts given up while the stub was still working on them
    assert judge.counts == counts(requests=2, retries=1, timeouts=2, failures=1)
    assert stub.calls == 2


def test_connection_errors_are_retried(monkeypatch):
    monkeypatch.setattr(judge_module, "_pause", lambda seconds, stop: False)
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = HTTPJudge(base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key_env=None, both_orders=False,
                      max_retries=2, timeout=1.0)  # fmt: skip
    with pytest.raises(RuntimeError, match="all 1 requests"):
        judge.compare(PROMPTS[:1], FIRST[:1], SECOND[:1])
    assert judge.counts == counts(requests=3, retries=2, failures=1)


def test_is_timeout():
    assert _is_timeout(TimeoutError("timed out")) and _is_timeout(socket.timeout("timed out"))  # noqa: UP041
    assert _is_timeout(urllib.error.URLError(TimeoutError("timed out")))
    assert not _is_timeout(urllib.error.URLError(ConnectionRefusedError(111, "refused")))
    assert not _is_timeout(ConnectionResetError())


def test_client_error_is_not_retried(stub, make_judge):
    stub.mode = "400"
    judge = make_judge(both_orders=False, max_retries=3)
    with pytest.raises(RuntimeError, match="HTTP 400.*unknown model"):
        judge.compare(PROMPTS[:1], FIRST[:1], SECOND[:1])
    assert judge.counts["requests"] == 1 and judge.counts["retries"] == 0 and stub.calls == 1


def test_echoed_key_is_redacted(stub, make_judge):
    stub.mode = "echo_auth_400"
    judge = make_judge(both_orders=False)
    with pytest.raises(RuntimeError, match=r"Bearer \*\*\*") as info:
        judge.compare(PROMPTS[:1], FIRST[:1], SECOND[:1])
    assert SECRET not in str(info.value)


def test_malformed_reply_is_a_failure(stub, make_judge):
    stub.mode = "malformed"
    judge = make_judge(both_orders=False, max_retries=3)
    with pytest.raises(RuntimeError, match="malformed chat completion"):
        judge.compare(PROMPTS[:1], FIRST[:1], SECOND[:1])
    assert stub.calls == 1


def test_concurrency_is_bounded(stub, make_judge):
    stub.delay = 0.05
    judge = make_judge(concurrency=2)
    prompts = [f"Review item {i}." for i in range(4)]
    assert judge.compare(prompts, ["GOOD"] * 4, ["meh"] * 4) == [1.0] * 4
    assert stub.calls == 8
    assert 1 <= stub.max_in_flight <= 2


def judge_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.startswith("judge")}


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("both_orders", [True, False])
def test_verdicts_stream_as_pairs_complete(stub, make_judge, both_orders):
    prompts = ["SLOW review 0", "Review 1.", "SLOW review 2", "Review 3.", "GARBAGE 4"]
    first = ["GOOD a", "b", "GOOD c", "d", "GOOD e"]
    second = ["x", "GOOD y", "z", "GOOD w", "v"]
    judge = make_judge(both_orders=both_orders)
    groups = []
    for group in judge.compare_iter(prompts, first, second):
        groups.append(group)
        if len(groups) == 3:  # every fast pair is in while the slow ones are still waiting for the stub
            assert not stub.slow.is_set()
            assert sorted(position for g in groups for position, _ in g) == [1, 3, 4]
            stub.slow.set()
    assert all(len(group) == 1 for group in groups)
    assert sorted(position for group in groups for position, _ in group) == [0, 1, 2, 3, 4]
    streamed = dict(pair for group in groups for pair in group)
    expected = make_judge(both_orders=both_orders).compare(prompts, first, second)
    assert same([streamed[i] for i in range(5)], expected) and same(expected, [1.0, -1.0, 1.0, -1.0, NAN])
    assert judge.counts == counts(requests=10 if both_orders else 5, unparseable=2 if both_orders else 1)


def test_dead_endpoint_raises_after_the_verdicts(stub, make_judge):
    stub.mode = "always500"
    judge = make_judge(max_retries=0)
    groups = []
    with pytest.raises(RuntimeError, match="all 4 requests"):
        for group in judge.compare_iter(PROMPTS[:2], FIRST[:2], SECOND[:2]):
            groups.append(group)
    assert sorted(position for group in groups for position, _ in group) == [0, 1]
    assert all(math.isnan(verdict) for group in groups for _, verdict in group)


def test_closing_early_stops_the_requests(stub, make_judge):
    before = judge_threads()
    stub.delay = 0.05
    judge = make_judge(both_orders=False, concurrency=1)
    prompts = [f"Review item {i}." for i in range(20)]
    groups = judge.compare_iter(prompts, ["GOOD"] * 20, ["meh"] * 20)
    assert next(groups) == [(0, 1.0)]
    groups.close()
    assert wait_until(lambda: not judge_threads() - before)
    assert stub.calls <= 2  # the one running when the consumer left, no queued one


def test_closing_early_ends_the_retries(stub, make_judge, monkeypatch):
    pauses = []  # whether each wait before a retry was ended by the consumer leaving (True), not by its 30 s
    real_pause = judge_module._pause

    def pause(seconds, stop):
        pauses.append(real_pause(seconds, stop))
        return pauses[-1]

    monkeypatch.setattr(judge_module, "_pause", pause)
    before = judge_threads()
    judge = make_judge(both_orders=False, max_retries=5, backoff=30.0, max_backoff=30.0)
    groups = judge.compare_iter(["Review it.", "FAIL one", "FAIL two"], ["GOOD a"] * 3, ["b"] * 3)
    assert next(groups) == [(0, 1.0)]
    assert wait_until(lambda: judge.counts["retries"] == 2)  # both failing requests are waiting to retry
    groups.close()
    assert wait_until(lambda: not judge_threads() - before, seconds=25.0)
    assert pauses == [True, True]  # both waits were cut short when the consumer left
    assert judge.counts == counts(requests=3, retries=2)


def test_compare_iter_checks_lengths_at_once(make_judge):
    with pytest.raises(ValueError, match="compare"):
        make_judge().compare_iter(["p"], ["a"], [])
    assert list(make_judge().compare_iter([], [], [])) == []


def test_take_counts(stub, make_judge):
    judge = make_judge(both_orders=False)
    assert judge.take_counts() == counts()
    judge.compare(PROMPTS[:2], FIRST[:2], SECOND[:2])
    assert judge.take_counts() == counts(requests=2)
    assert judge.take_counts() == counts()
    judge.compare(["GARBAGE it", "FAIL it"], ["a", "b"], ["c", "d"])
    assert judge.take_counts() == counts(requests=5, retries=3, failures=1, unparseable=1)
    assert judge.counts == counts(requests=7, retries=3, failures=1, unparseable=1)


def test_no_auth_without_key_env(stub, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judge = HTTPJudge(base_url=stub.url, model="m", api_key_env=None, both_orders=False)
    assert judge.compare(PROMPTS[:1], FIRST[:1], SECOND[:1]) == [1.0]
    assert stub.auth == [None]


def test_key_is_read_at_call_time(stub, make_judge, monkeypatch):
    judge = make_judge(both_orders=False)
    monkeypatch.setenv(KEY_ENV, "sk-rotated")
    judge.compare(PROMPTS[:1], FIRST[:1], SECOND[:1])
    assert stub.auth == ["Bearer sk-rotated"]
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=KEY_ENV):
        judge.compare(PROMPTS[:1], FIRST[:1], SECOND[:1])


@pytest.mark.parametrize("pasted", [SECRET, "Bearer abc", "abc def", "", "1PASSWORD"])
def test_pasted_key_is_not_shown(make_judge, pasted):
    with pytest.raises(ValueError) as info:
        make_judge(api_key_env=pasted)
    message = str(info.value)
    assert message.startswith(
        "data.annotator.init_args.api_key_env must be the NAME of an environment variable holding the key, "
        "not the key itself (the value given is not shown)"
    )
    assert not pasted or pasted not in message


def test_unset_key_env_names_only_conventional_names(make_judge, monkeypatch):
    token = "hf_AbCdEfGh0123456789aBcDeFgH"  # a key that is also a valid variable name
    monkeypatch.delenv(token, raising=False)
    monkeypatch.delenv("BPO_TEST_UNSET_VARIABLE", raising=False)
    with pytest.raises(ValueError, match="api_key_env names an environment variable") as info:
        make_judge(api_key_env=token)
    assert token not in str(info.value)
    with pytest.raises(ValueError, match="names environment variable BPO_TEST_UNSET_VARIABLE which is not set"):
        make_judge(api_key_env="BPO_TEST_UNSET_VARIABLE")
    monkeypatch.setenv(token, SECRET)
    judge = make_judge(api_key_env=token, both_orders=False)
    monkeypatch.delenv(token)
    with pytest.raises(ValueError, match="api_key_env") as info:
        judge.compare(PROMPTS[:1], FIRST[:1], SECOND[:1])
    assert token not in str(info.value)


def test_key_value_never_shown(stub, make_judge, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET + "\n")  # stray whitespace is not part of the key
    judge = make_judge(both_orders=False)
    assert judge.compare(PROMPTS[:1], FIRST[:1], SECOND[:1]) == [1.0]
    assert stub.auth == [f"Bearer {SECRET}"]
    loggable = [judge.identity, repr(judge), str(judge), json.dumps(vars(judge), default=repr)]
    assert all(SECRET not in text and KEY_ENV not in text for text in loggable[:3])
    assert all(SECRET not in text for text in loggable)
    monkeypatch.setenv(KEY_ENV, "sk-with\nnewline")  # refused by http.client, whose message quotes the header
    with pytest.raises(RuntimeError, match="Invalid header") as info:
        judge.compare(PROMPTS[:1], FIRST[:1], SECOND[:1])
    assert "sk-with" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"base_url": "127.0.0.1:8000/v1"}, "base_url"),
        ({"base_url": ""}, "base_url"),
        ({"model": " "}, "model"),
        ({"api_key_env": "BPO_TEST_UNSET_VARIABLE"}, "api_key_env"),
        ({"template": "{prompt} {response_a}"}, "template"),
        ({"template": "{prompt} {response_a} {response_b} {other}"}, "template"),
        ({"template": "{prompt} {response_a} {response_b} {"}, "template"),
        ({"concurrency": 0}, "concurrency"),
        ({"max_retries": -1}, "max_retries"),
        ({"timeout": 0}, "timeout"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"backoff": -1.0}, "backoff"),
    ],
)
def test_arguments_are_validated(make_judge, monkeypatch, kwargs, key):
    monkeypatch.delenv("BPO_TEST_UNSET_VARIABLE", raising=False)
    with pytest.raises(ValueError, match=rf"data\.annotator\.init_args\.{key}"):
        make_judge(**kwargs)


def test_length_mismatch(make_judge):
    with pytest.raises(ValueError, match="compare"):
        make_judge().compare(["p"], ["a"], [])


@pytest.mark.parametrize(
    ("base_url", "url"),
    [
        ("http://h:8000", "http://h:8000/v1/chat/completions"),
        ("http://h:8000/v1/", "http://h:8000/v1/chat/completions"),
        ("https://api.example.com/v1/chat/completions", "https://api.example.com/v1/chat/completions"),
    ],
)
def test_endpoint(base_url, url):
    assert _endpoint(base_url) == url


def test_timeout_bounds_the_whole_request(stub, make_judge):
    """The reproduction: ``timeout`` bounded each socket read, so a server dripping its reply (a byte every 0.05 s,
    well inside the 0.3 s timeout) kept the request alive for as long as the reply lasted (80 bytes: 4 s), and the
    judge waited for all of it. The timeout now bounds the whole request: the judge gives up part-way."""
    stub.mode = "drip"
    judge = make_judge(both_orders=False, timeout=0.3, max_retries=0)
    with pytest.raises(RuntimeError, match="timed out") as info:
        judge.compare(PROMPTS[:1], FIRST[:1], SECOND[:1])
    dripped = stub.dripped
    whole = len(json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Preferred: A"}}]}))
    assert 0 < dripped < whole, (dripped, whole)  # given up while the reply was still arriving
    assert "init_args.timeout" in str(info.value)
    assert judge.counts == counts(requests=1, timeouts=1, failures=1)


def test_a_judge_whose_verdict_flips_with_every_request_shows_as_disagreements(stub, make_judge, tmp_path):
    """The reproduction: a judge answering A, B, A, B… whatever the responses passed the both-orders check, since
    the two orders of a pair were consecutive requests (A for (a, b), B for (b, a): "a wins", consistently). The two
    orders of a pair are now two requests apart, so such a judge gives both the same letter: a counted
    disagreement, through compare and through the cache alike."""
    from bpo_lightning.annotation import cached_verdicts
    from bpo_lightning.cache import AnnotationCache

    stub.mode = "flip"
    prompts = [f"Review item {i}." for i in range(4)]
    judge = make_judge(concurrency=1)  # requests reach the stub in the order they are sent
    assert same(judge.compare(prompts, ["GOOD"] * 4, ["meh"] * 4), [NAN] * 4)
    assert judge.counts == counts(requests=8, disagreements=4)
    cached = make_judge(concurrency=1)
    verdicts, _ = cached_verdicts(cached, AnnotationCache(tmp_path / "c.sqlite"), prompts, ["x"] * 4, ["yy"] * 4)
    assert same(verdicts, [NAN] * 4) and {v.kind for v in verdicts} == {"disagreement"}
    assert cached.counts == counts(requests=8, disagreements=4)


def test_no_verdicts_are_cached_with_their_kind_and_not_asked_again(stub, make_judge, tmp_path):
    """The reproduction: verdicts without a result were never cached, so a resumed run or another run sharing the
    cache paid for them again. Each is now stored with its kind (per order: unparseable, failed; a disagreement is
    its two stored orders) and reused; ``ask_again`` asks the kinds it names again."""
    from bpo_lightning.annotation import JoinedPairs, cached_verdicts
    from bpo_lightning.cache import AnnotationCache

    cache = AnnotationCache(tmp_path / "c.sqlite")
    prompts = ["Review it.", "GARBAGE prompt", "BIASED prompt", "FAIL here"]
    first, second = ["GOOD a", "GOOD b", "GOOD c", "GOOD d"], ["w", "x", "y", "z"]
    judge = make_judge(max_retries=0)
    verdicts, paid = cached_verdicts(judge, cache, prompts, first, second, origin="run")
    assert verdicts[0] == 1.0 and [v.kind for v in verdicts[1:]] == ["unparseable", "disagreement", "failed"]
    assert paid == [0, 1, 2, 3] and stub.calls == 8
    stored = cache.get(judge.one_order().identity, prompts[1:2], [JoinedPairs.join(first[1], second[1])])
    assert stored[0].kind == "unparseable"
    again = make_judge(max_retries=0)  # a resumed run, or another run sharing the cache
    verdicts, paid = cached_verdicts(again, cache, prompts, first, second, origin="another run")
    assert stub.calls == 8 and again.counts == counts() and paid == []  # nothing asked again
    assert verdicts[0] == 1.0 and [v.kind for v in verdicts[1:]] == ["unparseable", "disagreement", "failed"]
    asker = make_judge(max_retries=0, ask_again=["failed", "disagreement"])
    cached_verdicts(asker, cache, prompts, first, second)
    assert stub.calls == 12  # both orders of the failed pair and of the disagreeing one, not the unparseable one
    single = make_judge(max_retries=0, both_orders=False)  # one request per pair: its no-verdicts are kept too
    cached_verdicts(single, cache, prompts, first, second)
    cached_verdicts(make_judge(max_retries=0, both_orders=False), cache, prompts, first, second)
    assert stub.calls == 16


class Scripted(judge_module.LLMJudge):
    """Prefers the longer response, one reply at a time; raises after ``fail_after`` replies (an endpoint going
    away). ``asked`` holds every judge prompt sent."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__("scripted", template="{prompt}|{response_a}|{response_b}")
        self.fail_after, self.asked = fail_after, []

    def _complete_iter(self, texts):
        for k, text in enumerate(texts):
            if len(self.asked) == self.fail_after:
                raise ConnectionError("endpoint went away")
            self.asked.append(text)
            self._count("requests")
            _, a, b = text.split("|")
            yield k, "Preferred: A" if len(a) >= len(b) else "Preferred: B"


def test_a_pair_with_one_order_answered_keeps_it_and_counts_carry_over(tmp_path):
    """The reproduction: a pair's verdict was cached only once both orders were in, so a stop with one order of a
    pair answered paid for that order again. Each order is now stored as it is answered: the rerun asks only the
    orders not answered, and what the first attempt's stored answers cost is credited to the rerun's counters."""
    from bpo_lightning.annotation import cached_verdicts
    from bpo_lightning.cache import AnnotationCache
    from bpo_lightning.errors import RunError

    cache = AnnotationCache(tmp_path / "c.sqlite")
    prompts, first, second = [f"p{i}" for i in range(4)], ["aa", "b", "ccc", "d"], ["a", "bbb", "c", "dd"]
    broken = Scripted(fail_after=3)  # orders are asked as pair 0, pair 1, pair 0 swapped, …: pair 1 is half done
    with pytest.raises(RunError, match="failed after 3 of 8 answers"):
        cached_verdicts(broken, cache, prompts, first, second, origin="run")
    resumed, credit = Scripted(), {}
    verdicts, paid = cached_verdicts(resumed, cache, prompts, first, second, origin="run", credit=credit)
    assert verdicts == [1.0, -1.0, 1.0, -1.0] and paid == [0, 1, 2, 3]
    assert not set(resumed.asked) & set(broken.asked) and len(resumed.asked) == 5  # 3 + 5: each order once
    assert credit == {"requests": 3} and resumed.counts["requests"] == 5


def test_an_endpoint_dying_mid_call_stops_it_and_the_rest_goes_to_another(stub, make_judge, tmp_path):
    """An endpoint that stops answering part-way through a call used to turn the call's remaining pairs into
    failures, dropped for good, since only a call in which every request failed stopped the run. Requests that
    cannot reach the endpoint now stop the call after the verdicts: the answered orders are stored, the failed ones
    are not, and a second endpoint is asked only for the rest: no order is answered twice."""
    from bpo_lightning.annotation import cached_verdicts
    from bpo_lightning.cache import AnnotationCache
    from bpo_lightning.errors import RunError

    cache = AnnotationCache(tmp_path / "c.sqlite")
    prompts, first, second = [f"Review {i}." for i in range(4)], ["GOOD a"] * 4, ["b", "c", "d", "e"]
    stub.alive_for = 3  # three replies, then the server is gone
    with pytest.raises(RunError, match="could not reach"):
        cached_verdicts(make_judge(concurrency=1, max_retries=1), cache, prompts, first, second, origin="run")
    assert len(stub.answered) == 3
    other, stop = start_stub()
    try:
        judge = make_judge(base_url=other.url, concurrency=1)
        verdicts, _ = cached_verdicts(judge, cache, prompts, first, second, origin="run")
    finally:
        stop()
    assert verdicts == [1.0] * 4
    assert len(other.answered) == 5 and not set(other.answered) & set(stub.answered)


# --------------------------------------------------------------------------------------------------------------------
# LocalJudge
# --------------------------------------------------------------------------------------------------------------------

SHORT = "{prompt}|{response_a}|{response_b}|"


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    from bpo_lightning.tasks.reviews import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny_judge")
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def local_judge(tiny_lm_dir):
    return LocalJudge(str(tiny_lm_dir), template=SHORT, device="cpu", batch_size=4, max_new_tokens=3)


def fake_generate(texts, add_special_tokens=True):
    """Prefer the response starting with "good"; "???" for prompts starting with "garbage"."""
    replies = []
    for text in texts:
        prompt, response_a, _ = text.split("|")[:3]
        replies.append("???" if prompt == "garbage" else ("A" if response_a.startswith("good") else "Preferred: B"))
    return replies


def test_local_judge_plumbing(local_judge, monkeypatch):
    monkeypatch.setattr(local_judge, "_generate", fake_generate)
    out = local_judge.compare(["p", "q", "garbage"], ["good one", "bad", "good"], ["bad", "good two", "bad"])
    assert same(out, [1.0, -1.0, NAN])
    assert local_judge.counts == counts(requests=6, unparseable=2)
    monkeypatch.setattr(local_judge, "_generate", lambda texts, add_special_tokens=True: ["A"] * len(texts))
    assert same(local_judge.compare(["p"], ["good"], ["bad"]), [NAN])
    assert local_judge.counts["disagreements"] == 1
    assert local_judge.identity.startswith(f"LocalJudge:{local_judge.name_or_path}:template=")


def test_local_judge_streams_per_batch(local_judge, monkeypatch):
    batches = []
    monkeypatch.setattr(local_judge, "_generate", lambda texts, add: batches.append(len(texts)) or fake_generate(texts))
    long = " ".join(["word"] * 300)
    prompts, first, second = ["p", "q", "r", "s"], ["good a", "bad", long, "good d"], ["bad", "good b", "c", "bad"]
    seen = []
    for group in local_judge.compare_iter(prompts, first, second):
        seen.append((len(batches), group))
    assert [(n, [position for position, _ in group]) for n, group in seen] == [(0, [2]), (1, [0]), (1, [1]), (2, [3])]
    assert same([group[0][1] for _, group in seen], [NAN, 1.0, -1.0, 1.0])
    assert batches == [4, 2] and local_judge.counts == counts(requests=6, failures=2)


def test_local_judge_real_generate(local_judge, monkeypatch):
    calls = []
    generate = local_judge.lm.generate
    monkeypatch.setattr(local_judge.lm, "generate", lambda **kw: calls.append(kw["input_ids"].shape) or generate(**kw))
    out = local_judge.compare(["great film", "dull book", "fine album"], ["loved it", "meh", "ok"], ["meh", "ok", "no"])
    assert len(out) == 3 and all(v in (1.0, -1.0) or math.isnan(v) for v in out)
    assert local_judge.counts["requests"] == 6 and local_judge.counts["failures"] == 0
    assert 0 <= local_judge.counts["unparseable"] <= 6
    assert [shape[0] for shape in calls] == [4, 2]  # batch_size 4, left-padded batches
    assert local_judge.tokenizer.padding_side == "left"


def test_local_judge_too_long_prompt_is_a_failure(local_judge, monkeypatch):
    monkeypatch.setattr(local_judge, "_generate", fake_generate)
    long = " ".join(["word"] * 300)
    out = local_judge.compare(["p", "p"], ["good", long], ["bad", "bad"])
    assert same(out, [1.0, NAN])
    assert local_judge.counts["failures"] == 2 and local_judge.counts["requests"] == 2


def test_local_judge_chat_template(local_judge):
    local_judge.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert local_judge._render("x|y|z|") == "<user>x|y|z|<assistant>"


@pytest.mark.slow
def test_a_fit_stopped_by_a_dead_judge_resumes_against_another_endpoint_paying_nothing_twice(
    tmp_path, sft_dir, monkeypatch, capsys
):
    """`bpo fit` with an HTTP judge as annotator (and so as evaluator), whose endpoint dies after 70 replies (phase
    1's collection asks 30, the start evaluation and phase 1's 16 each: it dies in phase 2's collection): the run
    stops in one line naming the endpoint, exit 1. The same command with ``--ckpt_path last`` and another
    ``base_url`` (not part of the run's identity) finishes the run: the two endpoints were asked exactly the
    questions an uninterrupted run asks, none twice, and the run ends with the uninterrupted run's weights."""
    from bpo_lightning.cli import main

    monkeypatch.setattr("sys.argv", ["bpo"])

    def fit(run: Path, url: str, *extra: str) -> None:
        main(
            [
                "fit",
                "--config",
                str(Path(__file__).parents[1] / "configs" / "quickstart.yaml"),
                f"--trainer.default_root_dir={run}",
                f"--model.policy.init_args.cache_dir={sft_dir.parent}",
                "--model.policy.init_args.steps=40",
                "--data.budget=32",
                "--data.num_phases=2",
                "--data.batch_size=8",
                "--data.sampler.init_args.max_new_tokens=12",
                "--data.sampler.init_args.batch_size=8",
                "--data.sampler.init_args.progress=false",
                "--data.eval_prompts.init_args.limit=4",
                "--data.annotator=HTTPJudge",
                f"--data.annotator.init_args.base_url={url}",
                "--data.annotator.init_args.model=judge-model",
                "--data.annotator.init_args.api_key_env=null",
                "--data.annotator.init_args.backoff=0.0",
                "--data.annotator.init_args.max_retries=1",
                "--data.annotator.init_args.concurrency=2",
                *extra,
            ]
        )

    def served(mode: str, alive_for: int | None = None) -> tuple[StubState, callable]:
        state, stop = start_stub()
        state.mode, state.alive_for = mode, alive_for
        return state, stop

    full, stop = served("longer")
    try:
        fit(tmp_path / "full", full.url)
    finally:
        stop()
    first, stop = served("longer", alive_for=70)
    try:
        with pytest.raises(SystemExit) as stopped:
            fit(tmp_path / "run", first.url)
    finally:
        stop()
    assert stopped.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("bpo: error: ") and first.url in error, error
    assert len(first.answered) == 70 and (tmp_path / "run" / "checkpoints" / "phase-1.ckpt").exists()
    second, stop = served("longer")
    try:
        fit(tmp_path / "run", second.url, "--ckpt_path", "last")
    finally:
        stop()
    assert set(first.answered).isdisjoint(second.answered)  # nothing paid twice
    asked = first.answered + second.answered
    assert len(full.answered) > 70 and len(asked) == len(set(asked)) and sorted(asked) == sorted(full.answered)

    def weights(run: Path) -> dict:
        return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]

    want, got = weights(tmp_path / "full"), weights(tmp_path / "run")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
