"""Plugin discovery: built-ins, entry points, autoload switch, and errors that name the culprit."""

import textwrap

import pytest

from bpo_lightning import hookimpl
from bpo_lightning.cli import main
from bpo_lightning.plugins import AUTOLOAD_ENV, PluginError, format_plugins, load_plugins


def make_distribution(root, name, module, source, entry=None):
    """A minimal installed distribution on sys.path: a dist-info folder with an entry point, and its module."""
    dist = root / f"{name}-0.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text(f"[bpo_lightning]\n{entry or name} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    return tmp_path


def test_builtins_register_through_the_hooks():
    plugins = load_plugins(autoload=False)
    assert set(plugins.registries["losses"]) == {"DPOLoss", "IPOLoss", "SLiCLoss"}
    assert set(plugins.registries["samplers"]) == {"GenerateSampler", "StaticCacheSampler", "VLLMSampler"}
    assert set(plugins.registries["annotators"]) == {"RuleAnnotator", "RewardModelAnnotator", "HTTPJudge", "LocalJudge"}
    assert all(info.distribution == "bpo-lightning" and info.entry_point is None for info in plugins.infos)


def test_entry_point_plugin_is_loaded_and_listed(site):
    make_distribution(
        site,
        "bpo-lightning-hinge2",
        "hinge2_plugin",
        """
        from bpo_lightning import PreferenceLoss, hookimpl

        class SquaredHingeLoss(PreferenceLoss):
            def pair_losses(self, h):
                return (1 - self.beta * h).clamp(min=0) ** 2

        @hookimpl
        def register_losses(register):
            register(SquaredHingeLoss)
    """,
    )
    plugins = load_plugins()
    assert plugins.get("losses", "SquaredHingeLoss").__module__ == "hinge2_plugin"
    text = format_plugins(plugins)
    expected = "bpo-lightning-hinge2 0.3  module: hinge2_plugin  (entry point: bpo-lightning-hinge2 = hinge2_plugin)"
    assert expected in text
    assert "    losses: SquaredHingeLoss" in text


def test_autoload_can_be_disabled(site, monkeypatch):
    make_distribution(
        site,
        "obs-plugin",
        "obs_plugin_mod",
        """
        from bpo_lightning import hookimpl

        @hookimpl
        def on_phase_start(phase):
            pass
    """,
    )
    assert any(i.distribution == "obs-plugin" for i in load_plugins().infos)
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert not any(i.distribution == "obs-plugin" for i in load_plugins().infos)


def test_import_failure_names_distribution_and_entry_point(site):
    make_distribution(site, "broken-dist", "broken_mod", "import not_a_module_anywhere\n", entry="broken")
    with pytest.raises(PluginError) as err:
        load_plugins()
    message = str(err.value)
    assert "broken-dist 0.3" in message
    assert "entry point 'broken = broken_mod'" in message
    assert "failed to import: ModuleNotFoundError" in message and "not_a_module_anywhere" in message


def test_non_conforming_class_is_refused(site):
    make_distribution(
        site,
        "bad-kind",
        "bad_kind_mod",
        """
        from bpo_lightning import hookimpl

        class NotALoss:
            pass

        @hookimpl
        def register_losses(register):
            register(NotALoss)
    """,
    )
    with pytest.raises(PluginError, match=r"bad-kind 0\.3.*registered .*NotALoss.* not a subclass of .*PreferenceLoss"):
        load_plugins()


def test_name_collision_names_both_owners(site):
    make_distribution(
        site,
        "clash",
        "clash_mod",
        """
        from bpo_lightning import PreferenceLoss, hookimpl

        class OtherDPO(PreferenceLoss):  # (a distinct class name keeps config shorthands unambiguous later)
            def pair_losses(self, h):
                return -h

        @hookimpl
        def register_losses(register):
            register(OtherDPO, name="DPOLoss")
    """,
    )
    with pytest.raises(PluginError, match=r"clash 0\.3.*'DPOLoss', a name already taken by .*'bpo-lightning"):
        load_plugins()


def test_unknown_hook_is_refused(site):
    make_distribution(
        site,
        "typo-hook",
        "typo_hook_mod",
        """
        from bpo_lightning import hookimpl

        @hookimpl
        def register_loses(register):
            pass
    """,
    )
    with pytest.raises(PluginError, match=r"typo-hook 0\.3.*does not fit the hook contract.*register_loses"):
        load_plugins()


def test_cli_reports_a_broken_plugin_without_traceback(site, monkeypatch, capsys):
    import bpo_lightning.plugins as plugins_module

    monkeypatch.setattr(plugins_module, "_PLUGINS", None)
    make_distribution(site, "broken-cli", "broken_cli_mod", "raise RuntimeError('boom at import')\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["plugins"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("bpo: error: plugin from distribution 'broken-cli 0.3'")
    assert "RuntimeError: boom at import" in err and "Traceback" not in err
    monkeypatch.setattr(plugins_module, "_PLUGINS", None)


def test_bpo_plugins_lists_builtin_losses(capsys):
    main(["plugins"])
    out = capsys.readouterr().out
    assert "bpo-lightning 0.1.0  module: bpo_lightning.losses  (built-in)" in out
    assert "    losses: DPOLoss, IPOLoss, SLiCLoss" in out


def test_only_bpo_hookimpl_marked_functions_are_called():
    """bpo calls what ``bpo_lightning.hookimpl`` marks; a function marked for another pluggy project is not a hook
    implementation of bpo's, even under a hook's name."""
    import pluggy

    from bpo_lightning import DPOLoss

    class MarkedLoss(DPOLoss):
        """Marked (https://arxiv.org/abs/2305.18290)."""

    class OtherLoss(DPOLoss):
        """Another project's (https://arxiv.org/abs/2305.18290)."""

    other = pluggy.HookimplMarker("another_project")

    class Mine:
        @hookimpl
        def register_losses(self, register):
            register(MarkedLoss)

    class Theirs:
        @other
        def register_losses(self, register):
            register(OtherLoss)

    mine, theirs = Mine(), Theirs()
    plugins = load_plugins(autoload=False, extra=(mine, theirs))
    assert plugins.get("losses", "MarkedLoss") is MarkedLoss
    with pytest.raises(KeyError, match="no loss named 'OtherLoss'"):
        plugins.get("losses", "OtherLoss")
    assert set(plugins.registries["losses"]) == {"DPOLoss", "IPOLoss", "SLiCLoss", "MarkedLoss"}
    # what bpo records (and `bpo plugins` prints) for each: Mine registered its loss, Theirs registered nothing
    in_process = {info.module: info.registered for info in plugins.infos if info.distribution == "(in-process)"}
    assert in_process == {f"{__name__}@{id(mine):x}": {"losses": ["MarkedLoss"]}, f"{__name__}@{id(theirs):x}": {}}
    assert [impl.plugin for impl in plugins.hook.register_losses.get_hookimpls()][-1] is mine
