"""The plugin contract of bpo-lightning.

Discovery hooks (``register_*``) run once, when plugins load, before the command line is parsed: each receives a
``register`` callback and calls it with component classes. Observation hooks (``on_*``) fire at events of a run and
must not change its data. Hooks are called with keyword arguments; an implementation may take only the arguments
it needs. Every hook is documented in ``docs/hooks.md``.
"""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("bpo_lightning")
hookimpl = HookimplMarker("bpo_lightning")


@hookspec
def register_losses(register):
    """Register preference losses: call ``register(cls)`` for each ``PreferenceLoss`` subclass.

    The class name becomes the registry key and the config shorthand (``model.loss: IPOLoss``).
    """


@hookspec
def register_annotators(register):
    """Register annotators: call ``register(cls)`` for each ``Annotator`` subclass."""


@hookspec
def register_samplers(register):
    """Register samplers: call ``register(cls)`` for each ``Sampler`` subclass."""


@hookspec
def on_phase_start(phase, behavior_version):
    """A collection phase is about to sample its data.

    Args:
        phase: 0-based index of the phase (= Lightning epoch).
        behavior_version: version counter of the behavior model that will sample the phase's responses.
    """


@hookspec
def on_pairs_ready(phase, pairs, stats, run_dir):
    """A phase's preference pairs are built and saved, before training on them starts.

    Args:
        phase: 0-based index of the phase.
        pairs: list of ``PreferenceRecord`` (read-only view of the phase's kept pairs).
        stats: ``PhaseStats`` with counts of kept and dropped prompts by reason.
        run_dir: ``pathlib.Path`` of the run directory where the phase's records were written.
    """
