"""Config fields are checked for type and range when read, each error naming the key."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from rgo_jax.bench import cli, train
from rgo_jax.bench._validate import (
    NonFiniteError,
    check_fields,
    check_finite_losses,
    check_finite_state,
)


def _from_file(tmp_path, text):
    path = tmp_path / "c.json"
    path.write_text(text)
    return cli.config_from_args(cli._parser().parse_args(["--config", str(path)]))


@pytest.mark.parametrize(
    "fields, message",
    [
        ('{"learning_rate": "0.1"}', "learning_rate must be a number, got '0.1' (str)"),
        ('{"alpha": null}', "alpha must be a number, got None (null)"),
        ('{"seeds": 5}', "seeds must be a list, got 5 (int)"),
        ('{"hidden": 16}', "hidden must be a list, got 16 (int)"),
        ('{"hidden": "64"}', "hidden must be a list, got '64' (str)"),
        ('{"hidden": [64, 0]}', "hidden[1] must be a positive integer, got 0"),
        ('{"checkpoint": "false"}', "checkpoint must be true or false, got 'false' (str)"),
        ('{"input_projection": "yes"}', "input_projection must be true or false"),
        ('{"seeds": [-1]}', "seeds[0] must be an integer in [0, 4294967295], got -1"),
        ('{"seeds": [0.5]}', "seeds[0] must be an integer, got 0.5"),
        ('{"seeds": [4294967296]}', "seeds[0] must be an integer in [0, 4294967295]"),
        ('{"seeds": [0, 1, 0]}', "seeds lists 0 twice"),
        ('{"seeds": []}', "seeds is empty"),
        ('{"methods": ["rgo", "sgd", "rgo"]}', "methods lists 'rgo' twice"),
        ('{"fel_seed": -3}', "fel_seed must be an integer in [0, 4294967295], got -3"),
        ('{"fel_seed": "0"}', "fel_seed must be an intege"),
        ('{"vmap_memory_gb": 0}', "vmap_memory_gb must be positive, got 0"),
        ('{"vmap_memory_gb": "4"}', "vmap_memory_gb must be a numbe"),
        ('{"num_tasks": 1000000}', "num_tasks must be an integer in [1, 1000], got 1000000"),
        ('{"steps_per_task": 10.0}', "steps_per_task must be an integer, got 10.0"),
        ('{"method_options": {"gpm_threshold": -5}}', "method_options.gpm_threshold must be > 0"),
        ('{"method_options": {"ewc_gamma": 2}}', "method_options.ewc_gamma must be >= 0 and <= 1"),
        ('{"method_options": [1]}', "method_options must be an object"),
        ('{"method_options": {"agem_batch": 2.5}}', "method_options.agem_batch must be an integer"),
        ('{"max_train_per_task": -5}', "max_train_per_task must be a positive integer, got -5"),
        ('{"validation_fraction": "0.1"}', "validation_fraction must be a numbe"),
        # item 4: non-finite or non-positive training values
        ('{"alpha": Infinity}', "alpha must be finite, got inf"),
        ('{"learning_rate": Infinity}', "learning_rate must be finite, got inf"),
        ('{"init_scale": Infinity}', "init_scale must be finite, got inf"),
        ('{"alpha": NaN}', "alpha must be finite, got nan"),
        ('{"alpha": [-1.0]}', "alpha must be a number, got [-1.0] (list)"),
        ('{"alpha": 0}', "alpha must be positive, got 0"),
        ('{"alpha": -0.5}', "alpha must be positive, got -0.5"),
    ],
)
def test_a_bad_field_in_a_config_file_names_the_key(tmp_path, fields, message):
    with pytest.raises(SystemExit) as err:
        _from_file(tmp_path, fields)
    assert str(err.value).startswith("rgo-bench: config file ") and "c.json: " in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize("text, kind", [("[]", "list"), ("5", "int"), ('"x"', "st")])
def test_a_config_file_must_hold_an_object(tmp_path, text, kind):
    with pytest.raises(SystemExit, match=f"must hold a JSON object of Config fields, got a {kind}"):
        _from_file(tmp_path, text)


def test_the_shipped_configs_still_read_to_the_same_fingerprint(tmp_path):
    # A well-formed file is read unchanged: the checks convert nothing.
    fields = {"benchmark": "permuted_digits", "hidden": [64, 32], "seeds": [0, 3], "alpha": 1}
    cfg = _from_file(tmp_path, json.dumps(fields))
    assert cfg.hidden == (64, 32) and cfg.seeds == (0, 3) and cfg.alpha == 1
    same = train.Config(**{**fields, "hidden": (64, 32), "seeds": (0, 3)})
    assert cfg.fingerprint() == same.fingerprint()


def test_every_published_run_configuration_passes_the_checks():
    # --option reads numbers as floats, so published runs hold counts such as 256.0.
    root = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    names = {f.name for f in dataclasses.fields(train.Config)}
    paths = sorted(root.glob("*/config.json"))
    assert paths, root
    for path in paths:
        fields = {k: v for k, v in json.loads(path.read_text()).items() if k in names}
        check_fields(fields)
        for k in ("methods", "seeds", "hidden"):
            if fields.get(k) is not None:
                fields[k] = tuple(fields[k])
        train.Config(**fields)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": float("inf")}, "alpha must be finite"),
        ({"learning_rate": float("nan")}, "learning_rate must be finite"),
        ({"init_scale": float("-inf")}, "init_scale must be finite"),
        ({"seeds": (0, 0)}, "seeds lists 0 twice"),
        ({"checkpoint": "false"}, "checkpoint must be true or false"),
        ({"hidden": ("6", "4")}, "hidden[0] must be an integer, got '6'"),
        ({"num_tasks": 10**6}, "num_tasks must be an integer in"),
    ],
)
def test_python_configs_are_checked_too(kwargs, message):
    with pytest.raises(ValueError) as err:
        train.Config(**kwargs)
    assert message in str(err.value)


def test_a_non_finite_loss_names_method_seed_task_and_step():
    losses = np.zeros((2, 5), np.float32)
    losses[1, 3] = np.inf
    with pytest.raises(NonFiniteError, match="method rgo, seed 7, task 4, step 23"):
        check_finite_losses(losses, "rgo", (3, 7), 4, 20)
    check_finite_losses(np.zeros((1, 3)), "rgo", (0,), 0, 0)  # finite: no error


def test_a_non_finite_p_names_the_leaf():
    import jax.numpy as jnp

    import rgo_jax

    state = rgo_jax.scale_by_rgo().init({"w": jnp.zeros((4, 2))})
    check_finite_state({"opt_state": state}, "rgo", 0, 2)
    p = state.p["w"].at[1, 1].set(jnp.nan)
    with pytest.raises(
        NonFiniteError, match=r"method rgo, seed 0, task 2 .*p\['w'\] \(4, 4\) holds 1 non-finite"
    ):
        check_finite_state({"opt_state": state._replace(p={"w": p})}, "rgo", 0, 2)


@pytest.mark.parametrize("key", ["owm.alpha", "owm_alpha"])
def test_an_option_flag_overrides_the_config_files_value_in_either_spelling(key):
    """The conv configs set ``owm_alpha`` (the flat name); ``--option owm.alpha=1000`` on top
    of one was refused as 'given twice', though flags override the file."""
    conv = str(Path(__file__).parents[2] / "benchmarks" / "configs" / "split_cifar10.json")
    cfg = cli.config_from_argv(["--config", conv, "--methods", "owm", "--option", f"{key}=1000"])
    assert cfg.method("owm").options.alpha == 1000.0
    assert cfg.method("agem").options.batch == 10  # the file's other options stay


def test_one_flag_giving_an_option_twice_is_still_refused():
    with pytest.raises(SystemExit, match="given twice"):
        cli.config_from_argv(
            ["--methods", "owm", "--option", "owm.alpha=5", "--option", "owm_alpha=7"]
        )
