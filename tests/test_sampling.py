"""Per-sample seeds: a sample depends on its seed only, not on the batch it was drawn in; its
conditioning comes from its own generator right after its latent."""

import torch

from sfdbench.harness.sampling import generate, noise_seed, seeded_inputs
from sfdbench.methods import FitContext, get_method
from sfdbench.suites.digits import DigitsCondSuite, DigitsSuite


def test_seed_zero_uses_sample_indices():
    assert [noise_seed(0, i) for i in range(3)] == [0, 1, 2]
    z = seeded_inputs(DigitsSuite(), 0, 5, 1)[0][0]
    torch.testing.assert_close(z, torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(5)))


def test_run_seeds_draw_different_noise():
    suite = DigitsSuite()
    (a, _), (b, _) = seeded_inputs(suite, 0, 0, 4), seeded_inputs(suite, 1, 0, 4)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(seeded_inputs(suite, 1, 2, 2)[0], b[2:])


def test_labels_come_from_the_samples_own_generator_after_its_latent():
    suite = DigitsCondSuite()
    latents, cond = seeded_inputs(suite, 0, 3, 4)
    for j in range(4):
        gen = torch.Generator().manual_seed(3 + j)
        torch.testing.assert_close(latents[j], torch.randn((1, 8, 8), generator=gen))
        expected = int(torch.randint(10, (), generator=gen))
        assert cond["class_labels"][j].argmax() == expected and cond["class_labels"][j].sum() == 1
    # the same sample in another batch gets the same label
    _, again = seeded_inputs(suite, 0, 5, 1)
    assert torch.equal(again["class_labels"][0], cond["class_labels"][2])
    # unconditional suites draw nothing after the latent
    assert seeded_inputs(DigitsSuite(), 0, 0, 3)[1] == {}


def test_samples_do_not_depend_on_batch_size(tmp_path):
    suite = DigitsSuite()
    fitted = get_method("dpmpp3m").fit(FitContext(suite=suite, teacher=suite.load_teacher(), nfe=3, workdir=tmp_path))
    one, _, stats = generate(fitted, suite, 0, 7, batch=7)
    chunked, _, _ = generate(fitted, suite, 0, 7, batch=3)
    assert stats["nfe_counted"] == 3 and stats["sampler_nfe"] == 3
    assert one.dtype == torch.uint8 and one.shape == (7, 1, 8, 8)
    # batched conv kernels may reorder float sums; the per-sample result must agree to round-off (1 uint8 level)
    assert (one.int() - chunked.int()).abs().max() <= 1
    first_two, _, _ = generate(fitted, suite, 0, 2, batch=2)
    assert (first_two.int() - one[:2].int()).abs().max() <= 1


def test_guided_sampling_counts_two_network_calls_per_step(tmp_path):
    suite = DigitsCondSuite()
    teacher = suite.load_teacher()
    fitted = get_method("ddim").fit(FitContext(suite=suite, teacher=teacher, nfe=3, workdir=tmp_path))
    plain, cond, plain_stats = generate(fitted, suite, 0, 6, batch=4)
    guided, cond2, stats = generate(fitted, suite, 0, 6, batch=4, guidance=2.0)
    assert plain_stats["nfe_counted"] == 3 and plain_stats["sampler_nfe"] == 3
    assert stats["nfe_counted"] == 6 and stats["sampler_nfe"] == 3
    assert torch.equal(cond["class_labels"], cond2["class_labels"])
    assert not torch.equal(plain, guided)
    uncond, _, stats0 = generate(fitted, suite, 0, 6, batch=4, guidance=0.0)
    assert stats0["nfe_counted"] == 3 and not torch.equal(uncond, plain)
