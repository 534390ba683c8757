"""The papers hetmerge reproduces or compares with: one record each, read by `hetmerge methods`, the README's
citations (a test keeps them in step) and CITATION.cff's references."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Paper:
    """A paper as `hetmerge methods` and the README cite it: short name, title, authors, venue and year, link."""

    short: str
    title: str
    authors: str
    venue: str
    year: int
    url: str

    def cite(self) -> str:
        """One line: 'ZipIt! (Stoica et al., ICLR 2024) https://arxiv.org/abs/2305.03053'."""
        first = self.authors.split(",")[0].split()[-1]
        others = " et al." if "," in self.authors else ""
        return f"{self.short} ({first}{others}, {self.venue} {self.year}) {self.url}"


PAPERS: dict[str, Paper] = {
    paper.short: paper
    for paper in (
        Paper(
            "ZipIt!",
            "ZipIt! Merging Models from Different Tasks without Training",
            "George Stoica, Daniel Bolya, Jakob Bjorner, Pratik Ramesh, Taylor Hearn, Judy Hoffman",
            "ICLR",
            2024,
            "https://arxiv.org/abs/2305.03053",
        ),
        Paper(
            "Git Re-Basin",
            "Git Re-Basin: Merging Models modulo Permutation Symmetries",
            "Samuel K. Ainsworth, Jonathan Hayase, Siddhartha Srinivasa",
            "ICLR",
            2023,
            "https://arxiv.org/abs/2209.04836",
        ),
        Paper(
            "MuDSC",
            "Training-Free Pretrained Model Merging",
            "Zhengqi Xu, Ke Yuan, Huiqiong Wang, Yong Wang, Mingli Song, Jie Song",
            "CVPR",
            2024,
            "https://arxiv.org/abs/2403.01753",
        ),
        Paper(
            "Heterogeneous merging",
            "Training-free Heterogeneous Model Merging",
            "Zhengqi Xu, Han Zheng, Jie Song, Li Sun, Mingli Song",
            "arXiv",
            2024,
            "https://arxiv.org/abs/2501.00061",
        ),
        Paper(
            "Neuron Interpolation",
            "Model Fusion via Neuron Interpolation",
            "Phoomraphee Luenam, Andreas Spanopoulos, Amit Sant, Thomas Hofmann, Sotiris Anagnostidis, Sidak Pal Singh",
            "arXiv",
            2025,
            "https://arxiv.org/abs/2507.00037",
        ),
        Paper(
            "FS-Merge",
            "Foldable SuperNets: Scalable Merging of Transformers with Different Initializations and Tasks",
            "Edan Kinderman, Itay Hubara, Haggai Maron, Daniel Soudry",
            "TMLR",
            2025,
            "https://arxiv.org/abs/2410.01483",
        ),
        Paper(
            "OTFusion",
            "Model Fusion via Optimal Transport",
            "Sidak Pal Singh, Martin Jaggi",
            "NeurIPS",
            2020,
            "https://arxiv.org/abs/1910.05653",
        ),
        Paper(
            "RegMean",
            "Dataless Knowledge Fusion by Merging Weights of Language Models",
            "Xisen Jin, Xiang Ren, Daniel Preotiuc-Pietro, Pengxiang Cheng",
            "ICLR",
            2023,
            "https://arxiv.org/abs/2212.09849",
        ),
        Paper(
            "KD",
            "Distilling the Knowledge in a Neural Network",
            "Geoffrey Hinton, Oriol Vinyals, Jeff Dean",
            "NIPS Deep Learning Workshop",
            2014,
            "https://arxiv.org/abs/1503.02531",
        ),
    )
}
"""Keyed by short name, which each method's `paper` names (None for the plain baselines, ensemble and averaging)."""
