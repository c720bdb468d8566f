"""README.md's options example: consistent sizes and the parameter count it claims."""

import os
import re

import yaml

from symatomic.data.targets import parse_target_options
from symatomic.model import SymatomicModel
from symatomic.options import check_options
from symatomic.pet import count_parameters

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _options_example():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## Your own data") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    claimed = re.search(r"~([0-9.]+) M parameters", block)
    return yaml.safe_load(block), float(claimed.group(1)) * 1e6


def test_options_example_is_small_and_counted_right():
    options, claimed = _options_example()
    model = check_options(options)["architecture"]["model"]
    example = yaml.safe_load(
        open(os.path.join(ROOT, "src", "symatomic", "examples", "options.yaml"))
    )["architecture"]["model"]
    sizes = ("d_pet", "d_node", "d_head", "d_feedforward", "num_heads")
    sizes += ("num_attention_layers", "num_gnn_layers", "cutoff")
    # every size is given (none silently at metatrain's large defaults)
    assert {name: options["architecture"]["model"][name] for name in sizes} == {
        name: example[name] for name in sizes
    }
    specs = {
        name: parse_target_options(name, target, "data.xyz")
        for name, target in options["training_set"]["targets"].items()
    }
    specs["mtt::polarizability"].set_cartesian_blocks(True)
    built = SymatomicModel(model, [1, 6, 8], specs, "angstrom")
    count = count_parameters(built)
    assert abs(count - claimed) <= 0.1 * claimed, count
