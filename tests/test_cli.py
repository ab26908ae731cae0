"""The command lines refuse mistakes with one line: no traceback, nothing silently ignored."""
from __future__ import annotations

import importlib.util
import os

import pytest

from conftest import ROOT, error_line


def parse():
    spec = importlib.util.spec_from_file_location("score_images_cli", os.path.join(ROOT, "pipelines", "score_images.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse


@pytest.mark.parametrize("argv, message", [
    (["--input", "a.jpg", "b.jpg"], "unexpected argument 'b.jpg': .*the shell expanded the glob; quote it"),
    (["--batch_size", "0"], "argument --batch_size: must be between 1 and 65536, got 0"),
    (["--workers", "0"], "argument --workers: must be between 1 and 4096, got 0"),
    (["--threads", "-1"], "argument --threads: must be between 0 and 1024, got -1"),
    (["--max_pixels", "0"], "argument --max_pixels: must be between 1 and 715827882, got 0"),
    (["--topk", "5000"], "--topk must be between 1 and 1000 \\(the labels of efficientnet_lite0:1\\), got 5000"),
    (["--model", "efficientnet_lite0:2"], "--model: model 'efficientnet_lite0' has no version '2'; its versions: 1"),
    (["--model", "resnet"], "--model: no model named 'resnet' in the zoo; known: efficientnet_lite0"),
    (["--runner=FlinkRuner"], "--runner: unknown runner 'FlinkRuner': beamzoo runs EdgeRunner, DirectRunner, FlinkRunner"),
    (["--runner=EdgeRunner", "--parallelism=2"], "unknown option --parallelism=2"),
    (["--frobnicate", "3"], "unknown option --frobnicate: neither score_images.py nor Beam knows it"),
])
def test_score_images_refuses_mistakes_when_parsing(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse()(["--output", "/tmp/never", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, error_line(err)), err  # one line, and a hint to --help
    assert "Traceback" not in err


def test_beam_options_pass_through_to_beam_runners():
    args, rest, card = parse()(["--output", "/tmp/o", "--parallelism", "2", "--direct_num_workers=1"])
    assert rest == ["--parallelism", "2", "--direct_num_workers=1"] and card.ref == "efficientnet_lite0:1"


def test_a_missing_java_says_what_to_install():
    import beamzoo
    from beamzoo.runners.options import OptionError
    with pytest.raises(OptionError, match="FlinkRunner needs Java 11 or newer, and '/nowhere/java' is not on PATH"):
        with beamzoo.beam_options(["--runner=FlinkRunner", "--job_server_java_launcher=/nowhere/java"]):
            pass


@pytest.mark.parametrize("argv", [
    ["run", "bundle", "--input", "x", "--output", "y"], ["keys", "new", "k"], ["models", "list"],
    ["models", "show", "efficientnet_lite0"], ["models", "verify"], ["serve", "--model", "efficientnet_lite0"],
    ["flink", "up"], ["flink", "down"], ["flink", "status"], ["flink", "fetch"],
])
def test_every_beamzoo_command_refuses_an_unknown_flag_in_one_line_with_its_own_help(argv, capsys):
    from beamzoo.cli import main
    assert main([*argv, "--bogus"]) == 2
    err = capsys.readouterr().err
    command = " ".join(a for a in argv if not a.startswith("-") and a in
                       ("run", "keys", "new", "models", "list", "show", "verify", "serve", "flink", "up", "down",
                        "status", "fetch"))
    assert err == f"error: unrecognized arguments: --bogus\n(see beamzoo {command} --help)\n"


def test_beamzoo_flink_names_its_commands_when_none_is_given(capsys):
    from beamzoo.cli import main
    assert main(["flink"]) == 2
    assert capsys.readouterr().err.startswith("error: the following arguments are required: {fetch,up,down,status}\n")
