import pytest

from fxopt import FxoptError, parse_target
from fxopt.targets import TARGETS


def test_targets_parse_from_short_strings():
    assert parse_target("cpu").kind == "llvm"
    cuda = parse_target("cuda:sm_90")
    assert cuda.kind == "cuda" and cuda.arch == "sm_90" and str(cuda) == "cuda:sm_90"
    assert parse_target("aarch64").arch == "aarch64-linux-gnu"
    for target in TARGETS.values():
        assert target.default_pipeline  # every target names its default pipeline


@pytest.mark.parametrize(
    "spec, message", [("cdua", "did you mean 'cuda'"), ("cpu:sm_90", "only cuda"), ("cuda:90", "only cuda")]
)
def test_bad_targets(spec, message):
    with pytest.raises(FxoptError, match=message):
        parse_target(spec)
