"""Pairwise LLM judges: ask a language model which of two responses to a prompt is better.

A judge fills a prompt template with ``{prompt}``, ``{response_a}`` and ``{response_b}`` and reads the verdict from
the model's reply, which should end with ``Preferred: A`` or ``Preferred: B`` (a bare ``A`` / ``B`` is accepted too,
see :func:`parse_verdict`). With ``both_orders`` (the default) every pair is judged twice, as (a, b) and as (b, a),
to cancel position bias: a pair whose two verdicts disagree gets no verdict and is dropped (and counted). The two
orders of a pair are sent two requests apart (:func:`~bpo_lightning.annotation.order_layout`), so a judge whose
verdict flips with every request shows as disagreements instead of passing. Unparseable replies and requests that
failed also give no verdict. A no-verdict is a :class:`~bpo_lightning.cache.NoScore` of kind ``"unparseable"``,
``"failed"`` or ``"disagreement"``: the annotation cache stores it with its kind and reuses it, unless ``ask_again``
names the kind. With ``both_orders`` each order is cached on its own, so a pair with one order answered keeps it.
``judge.counts`` holds the running counters ``requests`` (attempts sent), ``retries``, ``timeouts`` (both 0 for
:class:`LocalJudge`), ``failures`` (requests with no reply), ``unparseable`` and ``disagreements``;
``judge.take_counts()`` returns those accumulated since its previous call. ``judge.compare_iter`` yields each pair's
verdict as soon as its replies are in (both of them with ``both_orders``).

An OpenAI-compatible chat endpoint (vLLM, hosted APIs); the key is read from ``api_key_env`` at call time::

    data:
      annotator:
        class_path: bpo_lightning.judge.HTTPJudge
        init_args:
          base_url: http://127.0.0.1:8000/v1
          model: Qwen/Qwen2.5-7B-Instruct
          api_key_env: OPENAI_API_KEY   # null for an endpoint without authentication
          concurrency: 8
          max_retries: 3

A local ``transformers`` causal LM, greedy decoding::

    data:
      annotator:
        class_path: bpo_lightning.judge.LocalJudge
        init_args:
          name_or_path: Qwen/Qwen2.5-0.5B-Instruct
          batch_size: 8
          max_new_tokens: 8
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.client
import json
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch

from bpo_lightning.annotation import JoinedPairs, PairwiseAnnotator, on_process_device, order_layout, resolve_device
from bpo_lightning.cache import NoScore
from bpo_lightning.errors import InputError
from bpo_lightning.hookspecs import hookimpl

KEY = "data.annotator.init_args"

DEFAULT_TEMPLATE = """You are an impartial judge. Compare two responses to the same prompt and decide which one is \
more helpful: correct, relevant, clear and complete. Ignore the order in which the responses appear and their length.

[Prompt]
{prompt}

[Response A]
{response_a}

[Response B]
{response_b}

Answer with exactly one line: "Preferred: A" if Response A is better, or "Preferred: B" if Response B is better."""

_PREFERRED = re.compile(r"preferred(?:\s+response)?\s*[:=]\s*[\s*\"'`(\[]*(?:response\s+)?([ab])(?![a-z0-9])", re.I)
_STRIP = " \t\r\n*\"'`.,:;!()[]"
NO_VERDICT = ("unparseable", "disagreement", "failed")  # the kinds of no-verdict (NoScore) a judge gives
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONVENTIONAL_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def parse_verdict(text: str | None) -> float:
    """Read a judge's reply.

    The last ``Preferred: X`` in the text wins (case-insensitive, markdown emphasis and quotes tolerated);
    without one, a reply (or last non-empty line) that is just ``A`` or ``B`` counts.

    Args:
        text: The model's reply; ``None`` for no reply.

    Returns:
        ``1.0`` for A, ``-1.0`` for B, ``nan`` when no verdict can be read.
    """
    if not text:
        return math.nan
    matches = _PREFERRED.findall(text)
    if matches:
        letter = matches[-1].upper()
    else:
        lines = [line.strip(_STRIP) for line in text.strip().splitlines() if line.strip(_STRIP)]
        letter = lines[-1].upper() if lines else ""
    return {"A": 1.0, "B": -1.0}.get(letter, math.nan)


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise InputError(f"{KEY}.{name} {message}")


class LLMJudge(PairwiseAnnotator):
    """Shared logic of LLM judges: template, both-orders judging, verdict parsing and counters.

    Subclasses implement :meth:`_complete_iter`, which turns judge prompts into replies as they arrive (or
    :meth:`_complete`, all replies at once).

    Args:
        model: Name of the judge model (part of ``identity``).
        template: ``str.format`` template with ``{prompt}``, ``{response_a}`` and ``{response_b}`` (literal braces
            doubled); defaults to :data:`DEFAULT_TEMPLATE`.
        both_orders: Judge each pair as (a, b) and (b, a); disagreeing verdicts give ``nan``.
        ask_again: Kinds of no-verdict stored in the annotation cache that are asked again instead of reused:
            ``"failed"`` (a request that got no reply), ``"unparseable"``, ``"disagreement"`` (both orders are asked
            again). By default none is: a resumed run, or another run sharing the cache, pays for none twice.
    """

    not_provenance = ("ask_again",)  # which stored no-verdicts to ask again changes no verdict

    def __init__(
        self, model: str, template: str | None = None, both_orders: bool = True, ask_again: list[str] | None = None
    ) -> None:
        template = DEFAULT_TEMPLATE if template is None else template
        _check(isinstance(template, str) and bool(template.strip()), "template", "must be a non-empty string")
        for field in ("prompt", "response_a", "response_b"):
            _check("{" + field + "}" in template, "template", f"must contain {{{field}}}")
        try:
            template.format(prompt="", response_a="", response_b="")
        except (KeyError, IndexError, ValueError) as err:
            raise InputError(
                f"{KEY}.template is not a valid format string ({type(err).__name__}: {err}); "
                "double literal braces as {{ and }}"
            ) from err
        ask_again = list(ask_again or ())
        unknown = [kind for kind in ask_again if kind not in NO_VERDICT]
        _check(not unknown, "ask_again", f"names kinds of no-verdict among {list(NO_VERDICT)}, got {unknown}")
        self.model = model
        self.template = template
        self.both_orders = bool(both_orders)
        self.ask_again = tuple(ask_again)
        names = ("requests", "retries", "timeouts", "failures", "unparseable", "disagreements")
        self.counts: dict[str, int] = dict.fromkeys(names, 0)
        self._taken: dict[str, int] = dict(self.counts)
        self._lock = threading.Lock()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def totals(self) -> dict[str, int]:
        """A copy of the running counters."""
        with self._lock:
            return dict(self.counts)

    def take_counts(self) -> dict[str, int]:
        """The counters accumulated since the previous call (or since construction); ``counts`` keeps the totals."""
        with self._lock:
            taken = {name: value - self._taken.get(name, 0) for name, value in self.counts.items()}
            self._taken = dict(self.counts)
        return taken

    def _complete_iter(self, texts: list[str]) -> Iterator[tuple[int, str | None]]:
        """``(position, reply)`` for each judge prompt as its reply arrives, every position exactly once; the reply
        is ``None`` where none could be had (counted as a failure)."""
        yield from enumerate(self._complete(texts))

    def _complete(self, texts: list[str]) -> list[str | None]:
        """One reply per judge prompt, in order; ``None`` where none could be had (counted as a failure)."""
        raise NotImplementedError

    def _verdict(self, reply: str | None) -> float:
        """One reply's verdict: 1.0 (A), -1.0 (B), or why there is none (a failed request cost nothing)."""
        if reply is None:
            return NoScore("failed", paid=False)
        verdict = parse_verdict(reply)
        if math.isnan(verdict):
            self._count("unparseable")
            return NoScore("unparseable")
        return verdict

    def combine(self, forward: float, backward: float, count: bool = True) -> float:
        """A pair's verdict from the verdicts on it as shown and swapped: theirs when they agree, else no verdict
        (the kind of an order without one, or a disagreement, counted when ``count``)."""
        if math.isnan(forward) or math.isnan(backward):
            return forward if math.isnan(forward) else backward
        if forward != -backward:  # the swapped order's "A" is the second response
            if count:
                self._count("disagreements")
            return NoScore("disagreement")
        return forward

    def one_order(self) -> OneOrder | None:
        """With ``both_orders``, the judge asked one order at a time (cached on its own); else ``None``."""
        return OneOrder(self) if self.both_orders else None

    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> list[float]:
        """Judge each pair: ``1.0`` when ``first`` is preferred, ``-1.0`` when ``second`` is, else ``nan``."""
        results = [math.nan] * len(prompts)
        for group in self.compare_iter(prompts, first, second):
            for position, verdict in group:
                results[position] = verdict
        return results

    def compare_iter(
        self, prompts: list[str], first: list[str], second: list[str]
    ) -> Iterator[list[tuple[int, float]]]:
        """The verdicts of :meth:`compare` as they are known: one group ``[(position, verdict)]`` per pair, yielded
        as soon as its reply (with ``both_orders``, both of its replies) arrived. Closing the iterator early stops
        the requests not yet sent."""
        if not len(prompts) == len(first) == len(second):
            raise InputError(f"compare: {len(prompts)} prompts, {len(first)} first and {len(second)} second responses")
        if not self.both_orders:
            return self._orders([self._fill(p, a, b) for p, a, b in zip(prompts, first, second, strict=True)])
        layout = order_layout(len(prompts))  # the two orders of a pair near each other, so that pairs complete early
        texts = [
            self._fill(prompts[i], second[i], first[i]) if swapped else self._fill(prompts[i], first[i], second[i])
            for i, swapped in layout
        ]
        return self._pairs(texts, layout)

    def _fill(self, prompt: str, response_a: str, response_b: str) -> str:
        return self.template.format(prompt=prompt, response_a=response_a, response_b=response_b)

    def _orders(self, texts: list[str]) -> Iterator[list[tuple[int, float]]]:
        """Each judge prompt's verdict as its reply arrives."""
        if not texts:
            return
        replies = self._complete_iter(texts)
        try:
            for position, reply in replies:
                yield [(position, self._verdict(reply))]
        finally:
            replies.close()

    def _pairs(self, texts: list[str], layout: list[tuple[int, bool]]) -> Iterator[list[tuple[int, float]]]:
        """Each pair's verdict once the replies to both of its orders (``layout``) arrived."""
        halves: dict[int, tuple[bool, float]] = {}
        orders = self._orders(texts)
        try:
            for [(position, verdict)] in orders:
                pair, swapped = layout[position]
                if pair not in halves:
                    halves[pair] = (swapped, verdict)
                    continue
                _, other = halves.pop(pair)
                forward, backward = (other, verdict) if swapped else (verdict, other)
                yield [(pair, self.combine(forward, backward))]
        finally:
            orders.close()

    @property
    def identity(self) -> str:
        digest = hashlib.sha256(self.template.encode()).hexdigest()[:8]
        return f"{type(self).__name__}:{self.model}:template={digest}:both_orders={self.both_orders}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity})"


@dataclasses.dataclass
class _Call:
    """What the requests of one ``_complete_iter`` call share: the signal to stop, the errors of those that could not
    reach the endpoint, and the counters of those whose replies are not handed over yet."""

    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    unreachable: list[str] = dataclasses.field(default_factory=list)
    in_flight: dict[str, int] = dataclasses.field(default_factory=dict)


class OneOrder:
    """A both-orders judge asked one order at a time: ``(prompt, JoinedPairs.join(a, b))`` → its verdict on the
    request that shows ``a`` as A and ``b`` as B. Through the annotation cache each order is stored as its reply
    arrives (``bpo_lightning.annotation.cached_verdicts``), and the judge combines the two."""

    def __init__(self, judge: LLMJudge) -> None:
        self.judge = judge
        self.identity = f"{judge.identity}:one_order"
        self.ask_again = judge.ask_again

    def totals(self) -> dict[str, int]:
        return self.judge.totals()

    def score_iter(self, prompts: list[str], joined: list[str]) -> Iterator[list[tuple[int, float]]]:
        pairs = [text.split(JoinedPairs.SEPARATOR, 1) for text in joined]
        return self.judge._orders([self.judge._fill(p, a, b) for p, (a, b) in zip(prompts, pairs, strict=True)])


def _endpoint(base_url: str) -> str:
    """``.../v1/chat/completions`` from a server root, a ``.../v1`` base or the full endpoint URL."""
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


class HTTPJudge(LLMJudge):
    """A judge behind an OpenAI-compatible ``/v1/chat/completions`` endpoint, queried by a bounded thread pool.

    Requests answered 429 or 5xx and connection errors are retried with exponential backoff; other 4xx are not,
    and neither are timeouts unless ``retry_timeouts``. A request that still fails gives no verdict (counted in
    ``failures``); when every request of a call fails, or some could not reach the endpoint at all (refused or cut
    connections after the retries), :meth:`compare` / :meth:`compare_iter` raise ``RuntimeError`` after the
    verdicts: a dead endpoint stops the run, and a resume asks what it did not answer (against another
    ``base_url`` if need be) instead of dropping those pairs.

    Args:
        base_url: Server root, ``.../v1`` base or full ``.../v1/chat/completions`` URL (http or https).
        model: Model name sent with each request.
        api_key_env: Name of the environment variable holding the API key (sent as ``Authorization: Bearer``),
            read at call time and never stored or shown; ``None`` for no authentication.
        template: Judge prompt template (see :class:`LLMJudge`).
        both_orders: Judge each pair in both orders.
        temperature: Sampling temperature.
        max_tokens: Maximum reply length in tokens.
        timeout: Seconds one request may take in all (connecting, waiting, reading a reply however slowly it
            arrives); a request that times out is counted in ``timeouts``.
        max_retries: Retries per request after the first attempt.
        retry_timeouts: Retry a request that timed out like a connection error. Off by default: a slow endpoint
            may still be generating (and billing) the answer that was given up on, so a retry can pay twice.
        backoff: Base delay in seconds; retry ``k`` (from 0) waits ``backoff * 2**k``, capped by ``max_backoff``.
        max_backoff: Longest wait between two attempts in seconds (also caps a server's ``Retry-After``).
        concurrency: Maximum number of requests in flight.
        ask_again: Kinds of no-verdict stored in the annotation cache to ask again (see :class:`LLMJudge`).
    """

    # where and how patiently the judge is asked: another endpoint serving the same model, a longer timeout or more
    # requests in flight give the same verdicts (a run stopped by an outage continues with them)
    not_provenance = (
        "base_url",
        "api_key_env",
        "timeout",
        "max_retries",
        "backoff",
        "max_backoff",
        "concurrency",
        "retry_timeouts",
        "ask_again",
    )

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        template: str | None = None,
        both_orders: bool = True,
        temperature: float = 0.0,
        max_tokens: int = 16,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        concurrency: int = 8,
        retry_timeouts: bool = False,
        ask_again: list[str] | None = None,
    ) -> None:
        _check(
            isinstance(base_url, str) and re.match(r"https?://[^/\s]+", base_url or "") is not None,
            "base_url",
            f"must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}",
        )
        _check(isinstance(model, str) and bool(model.strip()), "model", "must be a non-empty model name")
        _check(
            api_key_env is None or (isinstance(api_key_env, str) and _ENV_NAME.fullmatch(api_key_env) is not None),
            "api_key_env",
            "must be the NAME of an environment variable holding the key, not the key itself "
            "(the value given is not shown); null for no authentication",
        )
        if api_key_env is not None:
            _check(
                bool(os.environ.get(api_key_env, "").strip()),
                "api_key_env",
                f"names {_env_name(api_key_env)} which is not set (or set api_key_env: null)",
            )
        _check(temperature >= 0, "temperature", f"must be >= 0, got {temperature}")
        _check(isinstance(max_tokens, int) and max_tokens >= 1, "max_tokens", f"must be an int >= 1, got {max_tokens}")
        _check(timeout > 0, "timeout", f"must be > 0, got {timeout}")
        _check(isinstance(max_retries, int) and max_retries >= 0, "max_retries", f"must be an int >= 0: {max_retries}")
        _check(backoff >= 0, "backoff", f"must be >= 0, got {backoff}")
        _check(max_backoff >= 0, "max_backoff", f"must be >= 0, got {max_backoff}")
        _check(isinstance(concurrency, int) and concurrency >= 1, "concurrency", f"must be an int >= 1: {concurrency}")
        super().__init__(model, template, both_orders, ask_again)
        self.base_url = base_url
        self.url = _endpoint(base_url)
        self.api_key_env = api_key_env
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.concurrency = concurrency
        self.retry_timeouts = bool(retry_timeouts)
        self._last_error = ""
        self._last_timed_out = False
        self._call: _Call | None = None  # the call under way

    def _api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise InputError(f"{KEY}.api_key_env: {_env_name(self.api_key_env)} is not set")
        return key

    def totals(self) -> dict[str, int]:
        """The running counters without the requests still in flight: what the replies handed over so far cost
        (the annotation cache stores it with them)."""
        with self._lock:
            flight = self._call.in_flight if self._call is not None else {}
            return {name: n - flight.get(name, 0) for name, n in self.counts.items()}

    def _complete_iter(self, texts: list[str]) -> Iterator[tuple[int, str | None]]:
        if not texts:
            return
        key = self._api_key()
        call = self._call = _Call()
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(texts)), thread_name_prefix="judge")
        costs: list[dict[str, int]] = [{} for _ in texts]  # each request's counters, settled as its reply is yielded
        failed = 0
        try:
            futures = {pool.submit(self._request, text, key, call, costs[i]): i for i, text in enumerate(texts)}
            for future in as_completed(futures):
                reply, i = future.result(), futures[future]
                failed += reply is None
                with self._lock:
                    for name, n in costs[i].items():
                        call.in_flight[name] -= n
                yield i, reply
        finally:  # also when the consumer stops early: drop the queued requests, end the retries of running ones
            call.stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            self._call = None
        if failed == len(texts):
            hint = f" (timeout {self.timeout:g} s: raise {KEY}.timeout)" if self._last_timed_out else ""
            raise RuntimeError(
                f"{type(self).__name__}: all {len(texts)} requests to {self.base_url} failed; "
                f"last error: {self._last_error}{hint}"
            )
        if call.unreachable:
            raise RuntimeError(
                f"{type(self).__name__}: {len(call.unreachable)} of {len(texts)} requests could not reach "
                f"{self.base_url}; last error: {call.unreachable[-1]}"
            )

    def _spend(self, name: str, call: _Call | None, cost: dict[str, int]) -> None:
        """Count ``name`` for a request: in the running counters, its own cost and its call's requests in flight."""
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1
            cost[name] = cost.get(name, 0) + 1
            if call is not None:
                call.in_flight[name] = call.in_flight.get(name, 0) + 1

    def _request(
        self, text: str, key: str | None, call: _Call | None = None, cost: dict[str, int] | None = None
    ) -> str | None:
        """POST one judge prompt, retrying transient errors; the reply text, or ``None`` after a final failure or
        when the call's ``stop`` is set before the next attempt. A final failure to connect is added to the call's
        ``unreachable``; what the request counts is added to ``cost`` too."""
        payload = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": text}],
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        stop, cost = call.stop if call is not None else None, {} if cost is None else cost
        for attempt in range(self.max_retries + 1):
            if stop is not None and stop.is_set():
                return None
            self._spend("requests", call, cost)
            retry_after = 0.0
            timed_out = connect_failed = False
            try:
                request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
                return self._content(_post(request, self.timeout), key)
            except urllib.error.HTTPError as err:
                retry = err.code == 429 or err.code >= 500
                error = f"HTTP {err.code} {err.reason}: {self._body(err)}"
                retry_after = _seconds(err.headers.get("Retry-After") if err.headers else None)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                error = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
                timed_out = _is_timeout(err)
                if timed_out:
                    self._spend("timeouts", call, cost)
                connect_failed = not timed_out and _is_connection_error(err)
                retry = self.retry_timeouts or not timed_out
            except ValueError as err:  # a 200 whose body is not a chat completion
                retry, error = False, str(err)
            if not retry or attempt == self.max_retries:
                break
            self._spend("retries", call, cost)
            if _pause(min(max(self.backoff * 2**attempt, retry_after), self.max_backoff), stop):
                return None
        with self._lock:
            self._last_error = _redact(error, key)
            self._last_timed_out = timed_out
            if connect_failed and call is not None:
                call.unreachable.append(self._last_error)
        self._spend("failures", call, cost)
        return None

    @staticmethod
    def _body(err: urllib.error.HTTPError) -> str:
        try:
            return err.read(300).decode(errors="replace").strip()
        except (OSError, http.client.HTTPException):
            return ""

    def _content(self, body: bytes, key: str | None) -> str:
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            snippet = _redact(body[:200].decode(errors="replace"), key)
            raise InputError(f"malformed chat completion from {self.url} ({type(err).__name__}): {snippet!r}") from None
        return content if isinstance(content, str) else ""


def _seconds(value: str | None) -> float:
    try:
        return max(float(value), 0.0) if value else 0.0
    except ValueError:
        return 0.0  # an HTTP date: fall back to exponential backoff


def _redact(text: str, key: str | None) -> str:
    """``text`` without the key, also where it was quoted as a Python literal."""
    if not key:
        return text
    for form in (key, repr(key)[1:-1]):
        text = text.replace(form, "***")
    return text


def _env_name(name: str) -> str:
    """How a message names the environment variable ``name``: an upper-case name as is, another one (a key such as
    ``hf_...`` looks like a variable name) not at all."""
    if _CONVENTIONAL_ENV_NAME.fullmatch(name):
        return f"environment variable {name}"
    return "an environment variable (its name is not shown: a name that is not upper case may be a pasted key)"


def _is_timeout(err: BaseException) -> bool:
    """Whether a request error is a timeout (``socket.timeout`` is ``TimeoutError``): raised as such, or wrapped by
    ``urllib`` as a ``URLError``'s reason."""
    return isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError)


def _is_connection_error(err: BaseException) -> bool:
    """Whether a request error means the endpoint could not be reached or dropped the connection (refused, reset,
    closed without a reply, no such host), raised as such or wrapped by ``urllib``."""
    reason = getattr(err, "reason", err)
    return isinstance(err, ConnectionError | http.client.RemoteDisconnected | socket.gaierror) or isinstance(
        reason, ConnectionError | socket.gaierror
    )


class _Deadline:
    """One request's whole-request timeout: the sockets it opens are shut down once ``seconds`` have passed.

    A socket's own timeout bounds each read only, so a server that drips its reply a byte at a time would keep a
    request alive far past it; shutting the socket down ends whatever read is waiting."""

    def __init__(self, seconds: float) -> None:
        self.expired = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired.is_set()
        if expired:
            _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired.set()
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Watched:
    """Mixin of the connection classes a request opens: each socket is handed to the request's ``_Deadline``."""

    def __init__(self, deadline: _Deadline, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        super().connect()
        self._deadline.watch(self.sock)


class _WatchedHTTP(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTP, self.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        kwargs = {"context": self._context}
        if getattr(self, "_check_hostname", None) is not None:  # an argument before Python 3.12
            kwargs["check_hostname"] = self._check_hostname
        return self.do_open(functools.partial(_WatchedHTTPS, self.deadline), req, **kwargs)


def _post(request: urllib.request.Request, timeout: float) -> bytes:
    """Send ``request`` and read the whole reply within ``timeout`` seconds in all, else ``TimeoutError``."""
    with _Deadline(timeout) as deadline:
        opener = urllib.request.build_opener(_HTTPHandler(deadline), _HTTPSHandler(deadline))
        try:
            with opener.open(request, timeout=timeout) as response:
                body = response.read()
        except (OSError, http.client.HTTPException) as err:
            if deadline.expired.is_set() and not isinstance(err, urllib.error.HTTPError):
                raise TimeoutError(f"timed out: no whole reply within {timeout:g} s") from err
            raise
        if deadline.expired.is_set():  # a reply cut short when the socket was shut down
            raise TimeoutError(f"timed out: no whole reply within {timeout:g} s")
    return body


def _pause(seconds: float, stop: threading.Event | None) -> bool:
    """Wait ``seconds`` before a retry; ``True`` when ``stop`` was set meanwhile (the caller gave up)."""
    if stop is None:
        time.sleep(seconds)
        return False
    return stop.wait(seconds)


class LocalJudge(LLMJudge):
    """A local ``transformers`` causal LM as judge, greedy-decoding its verdicts in batches.

    The judge prompt goes through the tokenizer's chat template when it has one, else is used as is. A prompt too
    long for the model's context gives ``nan`` (counted in ``failures``).

    Args:
        name_or_path: Hub id or local directory of an ``AutoModelForCausalLM``.
        template: Judge prompt template (see :class:`LLMJudge`).
        both_orders: Judge each pair in both orders.
        max_new_tokens: Tokens generated per verdict.
        batch_size: Judge prompts per ``generate`` call.
        device: ``"auto"`` (this process's CUDA device when CUDA is available, placed on first use), ``"cpu"`` or
            ``"cuda:N"``.
        trust_remote_code: Allow custom model code from the hub.
        ask_again: Kinds of no-verdict stored in the annotation cache to ask again (see :class:`LLMJudge`).
    """

    def __init__(
        self,
        name_or_path: str,
        template: str | None = None,
        both_orders: bool = True,
        max_new_tokens: int = 8,
        batch_size: int = 8,
        device: str = "auto",
        trust_remote_code: bool = False,
        ask_again: list[str] | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _check(isinstance(max_new_tokens, int) and max_new_tokens >= 1, "max_new_tokens", "must be an int >= 1")
        _check(isinstance(batch_size, int) and batch_size >= 1, "batch_size", "must be an int >= 1")
        super().__init__(name_or_path, template, both_orders, ask_again)
        self.name_or_path = name_or_path
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.device_setting = device  # placed on first use (``on_process_device``)
        if device != "auto":
            resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.lm = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        self.lm.requires_grad_(False).eval()
        self.max_positions = getattr(self.lm.config, "max_position_embeddings", None) or getattr(
            self.lm.config, "n_positions", None
        )

    def _render(self, text: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": text}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text

    def _complete_iter(self, texts: list[str]) -> Iterator[tuple[int, str | None]]:
        if not texts:
            return
        rendered = [self._render(text) for text in texts]
        special = not getattr(self.tokenizer, "chat_template", None)  # a chat template adds its own special tokens
        lengths = [len(ids) for ids in self.tokenizer(rendered, add_special_tokens=special)["input_ids"]]
        fits = [self.max_positions is None or n + self.max_new_tokens <= self.max_positions for n in lengths]
        self._count("failures", fits.count(False))
        yield from ((i, None) for i, ok in enumerate(fits) if not ok)
        todo = [i for i, ok in enumerate(fits) if ok]
        for start in range(0, len(todo), self.batch_size):  # the replies of each batch as soon as it is generated
            batch = todo[start : start + self.batch_size]
            replies = self._generate([rendered[i] for i in batch], special)
            self._count("requests", len(batch))
            yield from zip(batch, replies, strict=True)

    @torch.no_grad()
    def _generate(self, texts: list[str], add_special_tokens: bool = True) -> list[str]:
        """Greedy replies to already rendered judge prompts, ``batch_size`` at a time."""
        replies: list[str] = []
        device = on_process_device(self.lm, self.device_setting)
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                return_tensors="pt",
                add_special_tokens=add_special_tokens,
            ).to(device)
            out = self.lm.generate(
                **enc, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
            )
            new = out[:, enc["input_ids"].shape[1] :]
            replies.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return replies


@hookimpl
def register_annotators(register):
    register(HTTPJudge)
    register(LocalJudge)
