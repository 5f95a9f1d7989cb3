"""FedAvg equivalence: one full-batch SGD step per site, merged with weights = sample counts,
equals one centralized full-batch SGD step on the union of the sites' data."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.merge import apply_delta, weighted_average


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).double()  # float64 isolates the math from rounding


def sgd_step(model, batch, lr):
    model.zero_grad()
    model(input_ids=batch, labels=batch).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_merged_site_steps_equal_one_centralized_step():
    generator = torch.Generator().manual_seed(1)
    sites = [torch.randint(0, 97, (n, 16), generator=generator) for n in (3, 5, 8)]
    lr = 0.5
    start = params(tiny_model())

    deltas = []
    for batch in sites:
        model = tiny_model()
        sgd_step(model, batch, lr)
        after = params(model)
        deltas.append(({k: after[k] - start[k] for k in start}, float(len(batch))))
    merged = {k: v.clone() for k, v in start.items()}
    apply_delta(merged, {k: v.double() for k, v in weighted_average(deltas).items()})

    central = tiny_model()
    sgd_step(central, torch.cat(sites), lr)
    expected = params(central)

    worst = max((merged[k] - expected[k]).abs().max().item() for k in expected)
    assert worst < 1e-6, f"largest difference {worst}"
    moved = max((expected[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3  # the step really changed the model
