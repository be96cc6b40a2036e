import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snowfed.models import MODELS, ShortRes, build_model, tile_scores


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convs gain nothing from threads, and on a busy 2-core box they run 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("width", "norm", "skips", "size"),
    [(8, "none", True, (32, 32)), (16, "group", True, (64, 48)), (12, "group", False, (20, 36))],
)
def test_output_shape(width, norm, skips, size):
    model = ShortRes(in_channels=3, num_classes=2, width=width, norm=norm, skips=skips)
    assert model(torch.rand(2, 3, *size)).shape == (2, 2, *size)


def test_encoder_alone_gives_bottleneck_features():
    model = ShortRes(in_channels=1, num_classes=3, width=8)
    assert model.encoder(torch.rand(2, 1, 32, 16)).shape == (2, 8, 8, 4)
    assert model(torch.rand(2, 1, 32, 16)).shape == (2, 3, 32, 16)


def test_size_not_divisible_by_4_is_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        ShortRes(width=8)(torch.rand(1, 3, 30, 32))


def test_tile_scores_is_max_over_pixels():
    logits = torch.randn(4, 2, 16, 12)
    expected = logits.reshape(4, 2, -1).max(dim=-1).values
    assert torch.equal(tile_scores(logits), expected)


def test_stages_cover_every_parameter_once_in_forward_order():
    model = ShortRes(width=8)
    names = [name for name, _ in model.named_stages]
    assert names == ["stem", "enc1", "enc2", "bottleneck", "up1", "up2", "head"]
    staged = [id(p) for stage in model.stages for p in stage.parameters()]
    assert sorted(staged) == sorted(id(p) for p in model.parameters())
    assert len(staged) == len(set(staged))
    # the first stage sees the input channels, the last produces the classes
    assert model.stages[0][0].in_channels == 3 and model.stages[-1].out_channels == 2


def test_freezing_first_stages_leaves_them_untouched():
    torch.manual_seed(0)
    model = ShortRes(width=8)
    for p in (p for stage in model.stages[:3] for p in stage.parameters()):
        p.requires_grad_(False)
    before = {n: [p.detach().clone() for p in s.parameters()] for n, s in model.named_stages}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    F.cross_entropy(model(torch.rand(2, 3, 16, 16)), torch.randint(0, 2, (2, 16, 16))).backward()
    opt.step()
    changed = {
        name
        for name, stage in model.named_stages
        if any(not torch.equal(a, b) for a, b in zip(before[name], stage.parameters()))
    }
    assert changed == {"bottleneck", "up1", "up2", "head"}


def test_group_norm_has_no_batch_norm():
    model = ShortRes(width=16, norm="group")
    kinds = {type(m) for m in model.modules()}
    assert nn.GroupNorm in kinds
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert nn.GroupNorm in {type(m) for m in ShortRes(width=16).modules()}  # the default
    assert nn.GroupNorm not in {type(m) for m in ShortRes(width=16, norm="none").modules()}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_group_norm_model_gives_exact_per_sample_gradients_under_opacus():
    opacus = pytest.importorskip("opacus")
    torch.manual_seed(0)
    model = ShortRes(width=8, norm="group")
    reference = ShortRes(width=8, norm="group")
    reference.load_state_dict(model.state_dict())
    x, y = torch.rand(3, 3, 16, 16), torch.randint(0, 2, (3, 16, 16))
    F.cross_entropy(opacus.GradSampleModule(model)(x), y).backward()
    F.cross_entropy(reference(x[1:2]), y[1:2]).backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad_sample[1], q.grad, rtol=1e-4, atol=1e-6)


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="batch"):
        ShortRes(norm="batch")


def test_build_model():
    model = build_model("shortres", num_classes=3, width=8)
    assert isinstance(model, ShortRes) and model.head.out_channels == 3
    with pytest.raises(ValueError, match=r"'unet'.*shortres"):
        build_model("unet")
    assert "shortres" in MODELS


def test_seeded_construction_and_forward_are_deterministic():
    x = torch.rand(2, 3, 16, 16)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(ShortRes(width=8)(x))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(8)
    assert not torch.equal(outs[0], ShortRes(width=8)(x))


def _squares(n: int, size: int, generator: torch.Generator):
    """Bright squares on dark noise: a task any segmentation network must learn quickly."""
    x = 0.2 * torch.rand(n, 3, size, size, generator=generator)
    y = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        side = int(torch.randint(4, 10, (1,), generator=generator))
        r, c = torch.randint(0, size - side, (2,), generator=generator).tolist()
        y[i, r : r + side, c : c + side] = 1
    return x + 0.5 * y[:, None].float(), y


def test_a_few_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = _squares(4, 24, gen)
    model = ShortRes(width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with torch.no_grad():
        start = F.cross_entropy(model(x), y).item()
    # stable start: logits near zero, so the loss is close to log(2)
    assert abs(start - 0.693) < 0.05
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = F.cross_entropy(model(x), y).item()
    assert end < 0.8 * start


def _head_input_contrast(norm: str, images: torch.Tensor, foreground: torch.Tensor) -> float:
    """At initialisation: the squared distance between the mean foreground and the mean
    background feature at the head's input, relative to the features' variation across pixels."""
    torch.manual_seed(0)
    model = ShortRes(width=16, norm=norm)
    seen = {}
    model.head.register_forward_hook(lambda m, inputs, out: seen.setdefault("x", inputs[0]))
    with torch.no_grad():
        model(images)
    feats = seen["x"].permute(1, 0, 2, 3).reshape(16, -1)
    mask = foreground.reshape(-1)
    varying = feats.var(dim=1).sum()
    return float(((feats[:, mask].mean(1) - feats[:, ~mask].mean(1)) ** 2).sum() / varying)


def _pixel_f1_after_adam_steps(norm: str, images, masks, steps: int) -> float:
    torch.manual_seed(0)
    model = ShortRes(width=16, norm=norm)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    target = torch.from_numpy(masks > 0).long()
    for _ in range(steps):
        batch = torch.randint(len(images), (8,), generator=generator)
        loss = nn.functional.cross_entropy(model(images[batch]), target[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pred = model(images).argmax(1).bool()
    truth = target.bool()
    tp = (pred & truth).sum().item()
    return 2 * tp / max(1, pred.sum().item() + truth.sum().item())


def test_group_norm_is_what_leaves_the_all_background_plateau():
    """The mechanism of docs/results/learning.md: H&E tiles are bright and uncentred, so without
    normalisation the head's input is a common offset with little foreground/background
    contrast, and pixel cross-entropy with Adam first learns to predict background only.
    GroupNorm removes the offset at every layer: several times the contrast at the start, and
    the same 12 Adam steps end far from the plateau."""
    from snowfed.data.synthetic import generate
    from snowfed.evaluation import images_to_tensor

    images, masks = generate(24, 64, seed=11)
    x = images_to_tensor(images)
    contrast_none = _head_input_contrast("none", x, torch.from_numpy(masks > 0))
    contrast_group = _head_input_contrast("group", x, torch.from_numpy(masks > 0))
    assert contrast_group > 4 * contrast_none
    f1_none = _pixel_f1_after_adam_steps("none", x, masks, 12)
    f1_group = _pixel_f1_after_adam_steps("group", x, masks, 12)
    assert f1_none < 0.1  # still (almost) all background
    assert f1_group > 0.5
