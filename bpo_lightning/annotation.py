"""Annotators: score (prompt, response) pairs; the higher-scored response of a pair becomes the chosen one.

An annotator returns one float per response; ``nan`` marks a response it could not score (the pair is then
dropped and counted, never silently labelled), a :class:`~bpo_lightning.cache.NoScore` also says why (and is cached
with its kind). ``identity`` names the annotator and its settings; it is saved with every pair as provenance and
keys reuse on resume.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import math
import sys
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path

import torch

from bpo_lightning.arguments import RecordsArguments, describe
from bpo_lightning.cache import AnnotationCache, cached_score
from bpo_lightning.errors import InputError, RunError
from bpo_lightning.hookspecs import hookimpl


class Annotator(RecordsArguments):
    """Base class of annotators.

    ``identity`` keys cached scores and is saved with every phase: by default the class and the arguments its
    ``__init__`` was called with (recorded automatically), so two settings never share scores."""

    scores_per_call: int | None = 1
    """How many responses the default :meth:`score_iter` hands to one :meth:`score` call (``None``: all at once).
    Each call's scores are stored before the next call is made, so with 1 a kill loses at most the answer being
    computed; an annotator whose ``score`` is batched (a model's forward) raises it, or overrides ``score_iter``."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One score per (prompt, response); ``nan`` where no score could be given."""
        raise NotImplementedError

    def score_iter(self, prompts: list[str], responses: list[str]) -> Iterator[list[tuple[int, float]]]:
        """The scores as they are paid for: groups of ``(position, score)``, every position exactly once.

        The collection stores each group in the annotation cache before asking for the next, so a crash or a kill
        loses nothing already paid. The default calls :meth:`score` on ``scores_per_call`` responses at a time (one)
        and yields each call's scores; an annotator whose call pays for many answers (a judge's requests, a reward
        model's batches) yields each as it arrives.
        """
        size = self.scores_per_call or max(len(prompts), 1)
        for start in range(0, len(prompts), size):
            scores = list(self.score(prompts[start : start + size], responses[start : start + size]))
            if len(scores) != len(prompts[start : start + size]):
                raise RunError(
                    f"data.annotator: {self.identity} returned {len(scores)} scores for "
                    f"{len(prompts[start : start + size])} responses"
                )
            yield list(enumerate(scores, start))

    @property
    def identity(self) -> str:
        return describe(self, self.arguments)


class PairwiseAnnotator(Annotator):
    """Base class of annotators that compare two responses instead of scoring each (e.g. an LLM judge).

    ``compare`` returns, per prompt, a positive number when ``first`` is better, negative when ``second`` is,
    0 for a tie and ``nan`` when no verdict could be had (the pair is then dropped and counted). Pairwise
    annotators work with samplers that draw exactly 2 responses per prompt.
    """

    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> list[float]:
        raise NotImplementedError

    def compare_iter(
        self, prompts: list[str], first: list[str], second: list[str]
    ) -> Iterator[list[tuple[int, float]]]:
        """The verdicts as they are paid for: groups of ``(position, verdict)``, every position exactly once (see
        :meth:`Annotator.score_iter`); the default is one group from :meth:`compare`."""
        yield list(enumerate(self.compare(prompts, first, second)))

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        raise TypeError(f"{self.identity} compares pairs of responses; it has no per-response score")

    def one_order(self) -> Annotator | None:
        """A scorer of one ordered question, ``(prompt, JoinedPairs.join(a, b))`` → the verdict with ``a`` shown
        first, when a verdict on a pair combines the verdicts on its two orders (:meth:`combine`); ``None`` (the
        default) when a pair is judged at once. Each order is then cached on its own (:func:`cached_verdicts`), so
        a pair with one order answered keeps that answer."""
        return None

    def combine(self, forward: float, backward: float, count: bool = True) -> float:
        """A pair's verdict from its verdict as shown (``forward``) and swapped (``backward``); ``count``: whether
        this run paid for the pair (what it counts, it counts then)."""
        raise NotImplementedError


def order_layout(n: int) -> list[tuple[int, bool]]:
    """The order in which the 2·n one-order questions of n pairs are asked: ``(pair, swapped)``, the two orders
    of a pair two questions apart (0, 1, 0 swapped, 1 swapped, 2, 3, …). A verdict that flips with every request
    instead of following the responses (a stateful or broken endpoint) then gives both orders the same letter, a
    disagreement, instead of passing the both-orders check; an odd last pair asks its two orders in a row."""
    layout: list[tuple[int, bool]] = []
    for start in range(0, n, 2):
        pairs = range(start, min(start + 2, n))
        layout += [(i, False) for i in pairs] + [(i, True) for i in pairs]
    return layout


def cached_verdicts(
    judge: PairwiseAnnotator,
    cache: AnnotationCache | None,
    prompts: list[str],
    first: list[str],
    second: list[str],
    origin: str | None = None,
    credit: dict[str, int] | None = None,
) -> tuple[list[float], list[int]]:
    """Verdicts on the pairs (``first``, ``second``) through the annotation cache, and the positions this run paid
    for (see :func:`~bpo_lightning.cache.cached_score`, whose ``origin`` and ``credit`` these are).

    A judge that asks both orders (``one_order()``) has each order cached on its own: a pair with one order answered
    asks only the other, and the pairs (a, b) and (b, a) of a prompt share their requests. A stored disagreement is
    asked again (both orders) when the judge's ``ask_again`` names ``"disagreement"``."""
    joined = [JoinedPairs.join(a, b) for a, b in zip(first, second, strict=True)]
    orders = judge.one_order()
    if orders is None:
        return cached_score(JoinedPairs(judge), cache, prompts, joined, origin, credit=credit)
    # verdicts on whole pairs, which caches written before orders were cached on their own hold
    verdicts = cache.get(judge.identity, prompts, joined) if cache is not None else [None] * len(prompts)
    todo = [i for i, verdict in enumerate(verdicts) if verdict is None]
    layout = [(todo[k], swapped) for k, swapped in order_layout(len(todo))]
    asked = [prompts[i] for i, _ in layout]
    questions = [JoinedPairs.join(second[i], first[i]) if swapped else joined[i] for i, swapped in layout]
    at = {question: k for k, question in enumerate(layout)}
    renew = []
    if cache is not None and "disagreement" in (getattr(orders, "ask_again", None) or ()):
        known = cache.get(orders.identity, asked, questions)
        for i in todo:
            forward, backward = known[at[i, False]], known[at[i, True]]
            if forward is not None and forward == backward:  # NaN equals nothing
                renew += [at[i, False], at[i, True]]  # the same letter both ways: a stored disagreement
    answers, paid = cached_score(orders, cache, asked, questions, origin, renew=renew, credit=credit)
    paid_pairs = {layout[k][0] for k in paid}
    for i in todo:
        verdicts[i] = judge.combine(answers[at[i, False]], answers[at[i, True]], count=i in paid_pairs)
    return verdicts, sorted(paid_pairs)


class JoinedPairs:
    """A pairwise annotator seen as a scorer of ``join_pair(first, second)`` texts, so that its verdicts go
    through the same per-(prompt, text) annotation cache as scores do."""

    SEPARATOR = "\x00"

    def __init__(self, judge: PairwiseAnnotator) -> None:
        self.judge = judge
        self.identity = judge.identity
        self.ask_again = getattr(judge, "ask_again", ())
        self.totals = getattr(judge, "totals", None)

    @staticmethod
    def join(first: str, second: str) -> str:
        return first + JoinedPairs.SEPARATOR + second

    def score(self, prompts: list[str], joined: list[str]) -> list[float]:
        first, second = zip(*(text.split(JoinedPairs.SEPARATOR, 1) for text in joined), strict=True)
        return self.judge.compare(prompts, list(first), list(second))

    def score_iter(self, prompts: list[str], joined: list[str]) -> Iterator[list[tuple[int, float]]]:
        first, second = zip(*(text.split(JoinedPairs.SEPARATOR, 1) for text in joined), strict=True)
        return self.judge.compare_iter(prompts, list(first), list(second))


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → this process's CUDA device when CUDA is available (``torch.cuda.current_device()``, which
    Lightning sets for every training process before any sampling or annotation), else the CPU; any other value
    as given."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def on_process_device(model: torch.nn.Module, device: str) -> torch.device:
    """``model`` moved to ``resolve_device(device)`` if it is not there yet; that device. Local annotators and judges
    call it when they are used, not when they are built: a config builds them before Lightning has given each
    process its device, so placing them then would put every process's copy on the first GPU."""
    target = resolve_device(device)
    current = next(model.parameters()).device
    if current != target:
        model.to(target)
    return target


def import_callable(path: str, key: str) -> Callable:
    """Import ``package.module:function`` (or ``package.module.function``), or ``path/to/file.py:function`` from
    that file; ``key`` names the config entry.

    A module is imported from an installed package or a folder put on the import path (``PYTHONPATH``), never from
    one that only the working directory provides: ``bpo`` started in a folder holding a file of that name (a
    downloaded run, a cloned repository) must not run it. Such a module is named by its file path instead."""
    target, sep, attr = path.rpartition(":")
    if not sep:
        target, _, attr = path.rpartition(".")
    try:
        if target.endswith(".py"):
            module = _import_file(Path(target), key, path)
        else:
            _refuse_working_directory(target, key, path, attr)
            module = importlib.import_module(target)
        fn = getattr(module, attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise InputError(f"{key}: cannot import {path!r} ({type(err).__name__}: {err})") from None
    if not callable(fn):
        raise InputError(f"{key}: {path!r} is not callable")
    return fn


def _import_file(file: Path, key: str, path: str):
    """The module of a Python file named by its path (imported once per file)."""
    file = file.expanduser().resolve()
    if not file.is_file():
        raise InputError(f"{key}: {path!r} names {file}, which is not a file")
    name = f"_bpo_file_{file.stem}_{hashlib.sha256(str(file).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before it runs, as an import does (dataclasses and pickle look it up)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _refuse_working_directory(target: str, key: str, path: str, attr: str) -> None:
    """Refuse a module that would be imported from the working directory and from nowhere else on the path."""
    top = target.partition(".")[0]
    if not top:
        return  # a relative name: import_module explains
    cwd = Path.cwd().resolve()
    loaded = sys.modules.get(top)
    where = _location(loaded.__spec__ if loaded is not None else _find(top, None))
    if where is None or where.parent != cwd:
        return
    # sys.path's entries for the working directory: relative ones, and the one Python puts first for `python -m`,
    # `python -c` or a script started there (a later entry naming it, e.g. from PYTHONPATH, was asked for)
    entries = [e for e in sys.path if e and Path(e).is_absolute()]
    if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == cwd and sys.path[0] in entries:
        entries.remove(sys.path[0])
    if _location(_find(top, entries)) == where:
        return
    file = where / "__init__.py" if where.is_dir() else where
    raise InputError(
        f"{key}: {path!r} would be imported from the working directory ({file}), which is not an "
        f"installed package: name the file instead ({key}: {file}:{attr}), or install it"
    )


def _find(name: str, entries: list[str] | None):
    """The spec of top-level module ``name``, looked up in ``entries`` (``None``: ``sys.path``) and by the other
    finders (an editable install's)."""
    for finder in sys.meta_path:
        try:
            if finder is importlib.machinery.PathFinder or isinstance(finder, importlib.machinery.PathFinder):
                spec = importlib.machinery.PathFinder.find_spec(name, entries)
            elif hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, None)
            else:
                continue
        except (ImportError, ValueError):
            continue
        if spec is not None:
            return spec
    return None


def _location(spec) -> Path | None:
    """Where a module's spec points: a package's folder or a module's file; ``None`` for a built-in one."""
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    if spec.origin and spec.has_location:
        return Path(spec.origin).resolve()
    return None


class RuleAnnotator(Annotator):
    """Scores with any importable Python function ``fn(prompt, response) -> float``.

    Args:
        function: import path, ``"package.module:function"``.
        kwargs: extra keyword arguments passed to every call.
    """

    def __init__(self, function: str, kwargs: dict | None = None) -> None:
        self.function = function
        self.kwargs = dict(kwargs or {})
        self._fn = import_callable(function, "data.annotator.init_args.function")

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        scores = [math.nan] * len(prompts)
        for group in self.score_iter(prompts, responses):
            for k, value in group:
                scores[k] = value
        return scores

    def score_iter(self, prompts: list[str], responses: list[str]) -> Iterator[list[tuple[int, float]]]:
        """One answer at a time: the function is called per response, so each score is stored as soon as it exists
        (a kill inside a block loses at most the answer being computed)."""
        for k, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            value = self._fn(prompt, response, **self.kwargs)
            yield [(k, math.nan if value is None else value)]  # checked (a number?) where it is used

    @property
    def identity(self) -> str:
        """The import path, the keyword arguments and a digest of the function's code and of its module's source
        (what the function may call): an edited function is another annotator, whose scores are not reused."""
        extra = f"({self.kwargs})" if self.kwargs else ""
        return f"RuleAnnotator:{self.function}{extra}@{code_digest(self._fn)}"


def code_digest(fn) -> str:
    """A digest of ``fn``'s bytecode and constants and of its module's source file, when there is one."""
    import hashlib
    import inspect
    import marshal

    digest = hashlib.sha256()
    code = getattr(fn, "__code__", None)
    if code is not None:
        digest.update(marshal.dumps(code))
    try:
        source = inspect.getsourcefile(fn)
        if source:
            digest.update(Path(source).read_bytes())
    except (TypeError, OSError):  # a builtin, a class instance, a function defined in a REPL
        digest.update(repr(fn).encode())
    return digest.hexdigest()[:12]


class RewardModelAnnotator(Annotator):
    """A sequence-classification reward model with its own tokenizer, batched, no grad.

    The default input is the (question, answer) pair encoding of e.g. ``OpenAssistant/reward-model-deberta-v3-
    large-v2``; with ``pair_encoding=False`` prompt and response are concatenated into one text.

    Args:
        name_or_path: hub id or local directory of an ``AutoModelForSequenceClassification`` model.
        tokenizer: tokenizer id or path, if different from ``name_or_path``.
        batch_size: responses per forward pass.
        max_length: truncation length of the encoded input.
        pair_encoding: encode as (prompt, response) text pair.
        label_index: which output logit is the reward (0 for single-output reward models).
        device: ``"auto"`` (this process's CUDA device when CUDA is available, placed on first use), ``"cpu"`` or
            ``"cuda:N"``.
        trust_remote_code: allow custom model code from the hub.
        revision: hub revision (branch, tag or commit) of the model and tokenizer.

    ``identity`` names everything that changes a score: model (and, for a local folder, a digest of its weights),
    revision, tokenizer, label index, input encoding and length; cached scores are keyed by it.
    """

    def __init__(
        self,
        name_or_path: str,
        tokenizer: str | None = None,
        batch_size: int = 16,
        max_length: int = 512,
        pair_encoding: bool = True,
        label_index: int = 0,
        device: str = "auto",
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from bpo_lightning.policy import check_source, load_error

        self.name_or_path, self.tokenizer_path, self.revision = name_or_path, tokenizer or name_or_path, revision
        self.batch_size = batch_size
        self.max_length = max_length
        self.pair_encoding = pair_encoding
        self.label_index = label_index
        self.device_setting = device  # placed on first use (``on_process_device``)
        if device != "auto":
            resolve_device(device)  # a malformed device string fails here, not at the first score
        model_key, tokenizer_key = "data.annotator.init_args.name_or_path", "data.annotator.init_args.tokenizer"
        check_source(name_or_path, model_key, revision)
        if tokenizer:
            check_source(tokenizer, tokenizer_key, revision, kind="tokenizer")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                self.tokenizer_path, revision=revision, trust_remote_code=trust_remote_code
            )
        except OSError as err:
            raise load_error(err, tokenizer_key if tokenizer else model_key, self.tokenizer_path) from err
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, revision=revision, trust_remote_code=trust_remote_code
            )
        except OSError as err:
            raise load_error(err, model_key, name_or_path) from err
        self.model.requires_grad_(False).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [score for group in self.score_iter(prompts, responses) for _, score in group]

    @torch.no_grad()
    def score_iter(self, prompts: list[str], responses: list[str]) -> Iterator[list[tuple[int, float]]]:
        """One group per forward batch of ``batch_size`` responses."""
        device = on_process_device(self.model, self.device_setting)
        for start in range(0, len(prompts), self.batch_size):
            p, r = prompts[start : start + self.batch_size], responses[start : start + self.batch_size]
            texts = (p, r) if self.pair_encoding else ([a + b for a, b in zip(p, r, strict=True)],)
            enc = self.tokenizer(*texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
            logits = self.model(**enc.to(device)).logits  # (b, num_labels)
            yield list(enumerate(logits[:, self.label_index].float().tolist(), start))

    @cached_property
    def identity(self) -> str:
        from bpo_lightning.identity import weights_digest

        folder = Path(self.name_or_path).expanduser()
        weights = f":weights={weights_digest(folder)}" if folder.is_dir() else ""
        revision = f"@{self.revision}" if self.revision else ""
        tokenizer = f":tokenizer={self.tokenizer_path}" if self.tokenizer_path != self.name_or_path else ""
        return (
            f"RewardModelAnnotator:{self.name_or_path}{revision}{weights}{tokenizer}:label={self.label_index}"
            f":max_length={self.max_length}:pair={self.pair_encoding}"
        )


@hookimpl
def register_annotators(register):
    register(RuleAnnotator)
    register(RewardModelAnnotator)
