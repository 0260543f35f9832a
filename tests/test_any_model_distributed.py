"""``DistributedPipeline`` on a Hugging Face causal LM as it is: 2 gloo processes on 127.0.0.1.

Each process builds the same float64 model from a tiny config and keeps an
untouched copy as its reference: the loss must equal HF's shifted
cross-entropy recomputed in float64 and every parameter's gradient the plain
model's to 1e-12, over two steps at different shapes (uneven micro-batches
in the second), under 1F1B, ZB-H1 (split backward), ZB-V (the V puts the
tied embedding and head on one process) and interleaved 1F1B. The scenarios
live in any_model_dist_scenarios.py; a hang fails the test (run_world's deadline).
"""

from __future__ import annotations

import any_model_dist_scenarios
import pytest
from test_distributed import run_world

pytest.importorskip("transformers")

# One world of 2 processes tracing and probing nine models (about a minute on an idle 2-core machine,
# minutes on a loaded one): not marked slow, so CI runs the traced DistributedPipeline path.

TOLERANCE = 1e-12


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory) -> list[dict]:
    names = ["none_entries", "gpt2", "llama", "shared_buffer", "wire", "refusals"]
    # every process traces and probes nine models: a generous deadline (a hang still fails)
    return run_world(2, names, tmp_path_factory.mktemp("any-model-dist"), any_model_dist_scenarios.entry,
                     deadline=600.0)


def _no_crash(verdicts: list[dict], name: str) -> None:
    for rank, result in enumerate(verdicts):
        assert f"{name}:crash" not in result, f"rank {rank}:\n{result[f'{name}:crash']}"


CASES = ["gpt2/1f1b", "gpt2/zb-h1", "gpt2/zb-v", "llama/1f1b", "llama/zb-h1", "llama-tied/interleaved-1f1b"]


@pytest.mark.parametrize("case", CASES)
def test_loss_and_every_gradient_equal_the_plain_model(verdicts, case):
    _no_crash(verdicts, case.split("/")[0])
    found = [result[case] for result in verdicts]
    for rank, verdict in enumerate(found):
        assert verdict["loss"] <= TOLERANCE, (rank, verdict["loss"])
        assert verdict["grad"] <= TOLERANCE, (rank, verdict["grad"])
        assert not verdict["missing"], (rank, verdict["missing"])
    # each rank keeps only its own stages, and together they hold every parameter of the model
    covered = [set(v["covered"]) for v in found]
    assert covered[0] | covered[1] == set(found[0]["all"])
    assert covered[0] != covered[1]
    # the state dict keeps the model's keys: each rank its part, together the whole
    assert set(found[0]["state_keys"]) | set(found[1]["state_keys"]) == set(found[0]["model_keys"])


def test_tied_embedding_is_held_by_both_processes_where_its_stages_are_apart(verdicts):
    """GPT-2 under 1F1B: the embedding (stage 0, rank 0) and head (stage 1, rank 1) are one weight, held
    by both and reduced; under ZB-V stages 0 and 3 share rank 0, so rank 1 does not hold it."""
    _no_crash(verdicts, "gpt2")
    for case, holders in [("gpt2/1f1b", [True, True]), ("gpt2/zb-v", [True, False])]:
        assert verdicts[0][case]["tied"]
        assert ["transformer.wte.weight" in r[case]["covered"] for r in verdicts] == holders, case


def test_a_buffer_read_on_both_processes_is_replicated_from_the_lowest_holder(verdicts):
    _no_crash(verdicts, "shared_buffer")
    for rank, result in enumerate(verdicts):
        verdict = result["shared_buffer"]
        assert verdict["reads_buffer"], rank
        assert verdict["scale"] == 1.0, (rank, verdict)  # rank 1 started at 2.0
        assert verdict["grad"] <= TOLERANCE, (rank, verdict)


def test_the_mask_crosses_as_the_2d_mask_in_the_bytes_sent(verdicts):
    """Every tensor stage 0 hands the transport has at most 3 dims and none is (B, 1, T, T); and the
    bytes each forward message takes on the wire are exactly those tensors (16-byte status, each
    tensor padded to 16 bytes), so nothing else (no T^2 mask) travels beside them."""
    _no_crash(verdicts, "wire")
    shapes = verdicts[0]["wire"]["shapes"]
    assert shapes, "stage 0's forward hook saw no output"
    tokens = 10
    for shape in shapes:
        assert len(shape) <= 3 and shape[-2:] != [tokens, tokens], shapes
    per_message = len(shapes) // 2  # two micro-batches of 2 rows
    assert shapes[:per_message] == shapes[per_message:]
    assert [2, tokens] in shapes[:per_message]  # the attention mask itself (int64)
    sizes = []
    for shape in shapes[:per_message]:
        count = 1
        for size in shape:
            count *= size
        sizes.append(-(-count * 8 // 16) * 16)  # float64 and int64: 8 bytes each
    sends = [m for m in verdicts[0]["wire"]["sent"] if m["kind"] == "send" and m["action"].startswith("F")]
    assert len(sends) == 2
    assert all(m["bytes"] == 16 + sum(sizes) for m in sends), (sends, sizes)


def test_bad_inputs_fail_the_step_on_every_rank_and_leave_it_usable(verdicts):
    _no_crash(verdicts, "refusals")
    first, other = verdicts[0]["wrong_keys"], verdicts[1]["wrong_keys"]
    assert first.startswith("ValueError: inputs has keys ['input_ids'], but the cut was traced with"), first
    assert other.startswith("RemoteStepError: rank 0 (stage 0) refused the inputs: ValueError: inputs has keys"), other
    assert verdicts[0]["after"] and verdicts[1]["after"]
    assert verdicts[0]["forward"] is None and verdicts[1]["forward"] <= TOLERANCE  # pipe(inputs) on the last rank


def test_a_model_the_cut_cannot_capture_is_refused_on_every_rank(verdicts):
    _no_crash(verdicts, "refusals")
    for result in verdicts:
        assert result["uncapturable"].startswith("ModelCutError: DataDependent cannot be captured by "
                                                 "torch.export"), result["uncapturable"]


def test_none_in_a_stage_output_is_skipped_by_transport_and_comes_back_as_none(verdicts):
    _no_crash(verdicts, "none_entries")
    first, second = verdicts[0]["none_entries"], verdicts[1]["none_entries"]
    # every forward (and checkpointed recompute) of every micro-batch: None in its slot, not a tensor
    assert len(second["seen"]) >= 3 and set(second["seen"]) == {"NoneType"}, second
    assert first["sent"] == [16 + 2 * 6 * 8] * 3, first  # the hidden state alone: (2, 6) float64
    assert first["grad"] <= TOLERANCE and second["grad"] <= TOLERANCE
