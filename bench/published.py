"""The published recipe, re-typed as the baseline the benchmarks measure against."""

import torch

from idml import reference


def published_formula(mu, sigma, labels, proxies, margin=0.1, alpha=32.0, ism_offset=4.0, ism_scale=5.0):
    """The loss as the published code computes it: dense one-hot masks, raw exponentials,
    torch.where sums per proxy, no clamp on d (its label binarisation on the host and its
    debug print of the one-hot matrix are left out, which only makes this baseline faster)."""
    mu, sigma, proxies = mu.float(), sigma.float(), proxies.float()
    cos = torch.nn.functional.linear(reference.l2_normalize(mu), reference.l2_normalize(proxies))
    dist = mu.pow(2).sum(1, keepdim=True) + proxies.pow(2).sum(1) - 2 * mu @ proxies.t()
    unc = sigma.pow(2).sum(1, keepdim=True)
    sim = 1 - (1 - cos) * torch.exp(-(unc + ism_offset) / (ism_scale * dist))
    p_one_hot = torch.nn.functional.one_hot(labels, proxies.shape[0]).float()
    n_one_hot = 1 - p_one_hot
    pos_exp = torch.exp(-alpha * (sim - margin))
    neg_exp = torch.exp(alpha * (sim + margin))
    with_pos_proxies = torch.nonzero(p_one_hot.sum(dim=0) != 0).squeeze(dim=1)
    p_sim_sum = torch.where(p_one_hot == 1, pos_exp, torch.zeros_like(pos_exp)).sum(dim=0)
    n_sim_sum = torch.where(n_one_hot == 1, neg_exp, torch.zeros_like(neg_exp)).sum(dim=0)
    pos_term = torch.log(1 + p_sim_sum).sum() / len(with_pos_proxies)
    neg_term = torch.log(1 + n_sim_sum).sum() / proxies.shape[0]
    return pos_term + neg_term
