"""The methods, each declared once: its name, family, what adapts the model, its paper and reference code, and the
recipe fields only it reads. The command line, the trainers, the model card, ``--compare_methods``, the stability
grids and the README's method table all read this registry.

- **entropy** methods minimise a loss on the model's own token distribution, in ``ZeroSiamTrainer`` (TRL's
  ``DistillationTrainer`` with the loss hook replaced); ``none`` runs the same online stream with no update.
- **grpo** methods are GRPO with a label-free reward, in ``LabelFreeTrainer`` (TRL's ``GRPOTrainer``).

A field in :data:`METHOD_FIELDS` that the chosen method does not read is refused when it is given a value (on the
command line or in Python): accepted and ignored, it would make a comparison say something it did not run.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

FAMILIES = ("entropy", "grpo")


@dataclass(frozen=True)
class Paper:
    name: str
    title: str
    arxiv: str
    short: str  # how the README's table cites it
    citation: str  # BibTeX, for the model card

    def as_trl(self) -> dict[str, str]:
        """The ``_paper`` mapping TRL's trainers declare, which ``create_model_card`` reads."""
        return {"name": self.name, "title": self.title, "id": self.arxiv, "citation": self.citation}


@dataclass(frozen=True)
class Method:
    name: str  # the recipe's `method`
    family: str  # entropy | grpo
    summary: str  # what adapts the model
    paper: Paper | None
    reference: str | None  # the authors' code the defaults transcribe: repo@commit path lines
    fields: tuple[str, ...]  # the method-specific recipe fields it reads

    @property
    def config_class(self) -> type:
        return _resolve(FAMILY_CLASSES[self.family][0])

    @property
    def trainer_class(self) -> type:
        return _resolve(FAMILY_CLASSES[self.family][1])


# Each family's config and trainer, by dotted path (as transformers' auto mappings name classes): the registry sits
# below the configs and trainers, which read it, and imports neither.
FAMILY_CLASSES = {
    "entropy": ("zerosiam_llm.configs.ZeroSiamConfig", "zerosiam_llm.trainers.entropy.ZeroSiamTrainer"),
    "grpo": ("zerosiam_llm.configs.LabelFreeConfig", "zerosiam_llm.trainers.grpo.LabelFreeTrainer"),
}


def _resolve(dotted: str) -> type:
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


# The method-specific field groups (every other field is shared by all the methods of a family, or by all).
ENTROPY_FIELDS = ("optimizer", "momentum")  # the entropy trainer's optimizer; GRPO uses TrainingArguments' `optim`
ZEROSIAM_FIELDS = ENTROPY_FIELDS + (
    "alpha", "predictor", "predictor_rank", "predictor_learning_rate", "predictor_lr_ratio", "predictor_weight_decay",
    "predictor_max_grad_norm", "predictor_optimizer",
)  # fmt: skip
SAR_FIELDS = ENTROPY_FIELDS + ("sar_margin", "sar_margin_unit", "sar_rho", "sar_reset_below", "sar_reset_unit",
                               "sar_ema_decay")  # fmt: skip
VOTE_FIELDS = ("num_vote_rollouts", "vote_clustering")

REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method(
        name='zerosiam',
        family='entropy',
        summary='token entropy of the predictor branch + symmetric KL to the stop-gradient target',
        paper=Paper(
            name='ZeroSiam',
            title='ZeroSiam: An Efficient Asymmetry for Test-Time Entropy Optimization without Collapse',
            arxiv='2509.23183',
            short='Chen et al., ICLR 2026',
            citation=(
                '@inproceedings{chen2026zerosiam,\n  title={ZeroSiam: An Efficient Asymmetry for Test-Time '
                'Entropy Optimization without Collapse},\n  author={Chen, Guohao and Niu, Shuaicheng and '
                'Chen, Deyu and Yang, Jiahao and Zhang, Zitian and Tan, Mingkui and Wu, Pengcheng and Shen, '
                'Zhiqi},\n  booktitle={ICLR},\n  year={2026}\n}'
            ),
        ),
        reference='the paper (no LLM code published)',
        fields=ZEROSIAM_FIELDS,
    ),
    Method(
        name='tent',
        family='entropy',
        summary='token entropy (EM-FT)',
        paper=Paper(
            name='Tent',
            title='Tent: Fully Test-time Adaptation by Entropy Minimization',
            arxiv='2006.10726',
            short='Wang et al., ICLR 2021',
            citation=(
                '@inproceedings{wang2021tent,\n  title={Tent: Fully Test-time Adaptation by Entropy Minimization},\n '
                ' author={Wang, Dequan and Shelhamer, Evan and Liu, Shaoteng and Olshausen, Bruno and Darrell, '
                'Trevor},\n  booktitle={ICLR},\n  year={2021}\n}'
            ),
        ),
        reference="EM-FT (Agarwal et al. 2025) / Tent's softmax_entropy",
        fields=ENTROPY_FIELDS,
    ),
    Method(
        name='come',
        family='entropy',
        summary='entropy of a Dirichlet opinion, logit norm held fixed',
        paper=Paper(
            name='COME',
            title='COME: Test-time Adaption by Conservatively Minimizing Entropy',
            arxiv='2410.10894',
            short='Zhang et al., ICLR 2025',
            citation=(
                '@inproceedings{zhang2025come,\n  title={COME: Test-time Adaption by Conservatively Minimizing '
                'Entropy},\n  author={Zhang, Qingyang and Bian, Yatao and Kong, Xinke and Zhao, Peilin '
                'and Zhang, Changqing},\n  booktitle={ICLR},\n  year={2025}\n}'
            ),
        ),
        reference='BlueWhaleLab/COME@409a19b7 tent_come.py L45-52',
        fields=ENTROPY_FIELDS,
    ),
    Method(
        name='sar',
        family='entropy',
        summary='entropy of the reliable tokens, sharpness-aware, model recovery',
        paper=Paper(
            name='SAR',
            title='Towards Stable Test-Time Adaptation in Dynamic Wild World',
            arxiv='2302.12400',
            short='Niu et al., ICLR 2023',
            citation=(
                '@inproceedings{niu2023sar,\n  title={Towards Stable Test-Time Adaptation in Dynamic Wild '
                'World},\n  author={Niu, Shuaicheng and Wu, Jiaxiang and Zhang, Yifan and Wen, Zhiquan '
                'and Chen, Yaofo and Zhao, Peilin and Tan, Mingkui},\n  booktitle={ICLR},\n  year={2023}\n}'
            ),
        ),
        reference='mr-eggplant/SAR@20f6e24b sar.py L70-106, sam.py L19-42',
        fields=SAR_FIELDS,
    ),
    Method(
        name='none',
        family='entropy',
        summary='nothing (online baseline)',
        paper=None,
        reference=None,
        fields=(),
    ),
    Method(
        name='majority-vote',
        family='grpo',
        summary="GRPO, reward 1 when the rollout's answer grades equal to its group's most common answer string, "
        "else 0",
        paper=Paper(
            name='TTRL',
            title='TTRL: Test-Time Reinforcement Learning',
            arxiv='2504.16084',
            short='TTRL (2504.16084)',
            citation=(
                '@article{zuo2025ttrl,\n  title={TTRL: Test-Time Reinforcement Learning},\n  author={Zuo, '
                'Yuxin and Zhang, Kaiyan and others},\n  journal={arXiv preprint arXiv:2504.16084},\n  '
                'year={2025}\n}'
            ),
        ),
        reference='PRIME-RL/TTRL@3e2cc937 verl/verl/utils/reward_score/ttrl/ttt_metrics.py L18-27',
        fields=VOTE_FIELDS,
    ),
    Method(
        name='semantic-vote',
        family='grpo',
        summary="GRPO, reward = the share of the group in the rollout's answer cluster (0 for an all-distinct group)",
        paper=Paper(
            name='EMPO',
            title='Right Question is Already Half the Answer: Fully Unsupervised LLM Reasoning Incentivization',
            arxiv='2504.05812',
            short='EMPO (2504.05812)',
            citation=(
                '@article{zhang2025empo,\n  title={Right Question is Already Half the Answer: Fully Unsupervised '
                'LLM Reasoning Incentivization},\n  author={Zhang, Qingyang and others},\n  journal={arXiv '
                'preprint arXiv:2504.05812},\n  year={2025}\n}'
            ),
        ),
        reference='QingyangZhang/EMPO@c5eccd40 trl/src/open_r1/rewards.py L150-215',
        fields=VOTE_FIELDS,
    ),
    Method(
        name='entropy-reward',
        family='grpo',
        summary="GRPO, reward = minus the rollout's mean token entropy (-7 without a boxed answer)",
        paper=Paper(
            name='RENT',
            title='Maximizing Confidence Alone Improves Reasoning',
            arxiv='2505.22660',
            short='RENT (2505.22660), EM-RL',
            citation=(
                '@article{prabhudesai2025rent,\n  title={Maximizing Confidence Alone Improves Reasoning},\n '
                ' author={Prabhudesai, Mihir and Chen, Lili and Ippoliti, Alex and Fragkiadaki, Katerina '
                'and Liu, Hao and Pathak, Deepak},\n  journal={arXiv preprint arXiv:2505.22660},\n  year={2025}\n}'
            ),
        ),
        reference='satrams/rent-rl@5d4d38a7 verl/trainer/ppo/ray_trainer.py L1005-1044',
        fields=("no_answer_reward", "reward_temperature"),
    ),
    Method(
        name='self-certainty',
        family='grpo',
        summary="GRPO, reward = the rollout's mean `KL(uniform ‖ p_t)`",
        paper=Paper(
            name='Intuitor',
            title='Learning to Reason without External Rewards',
            arxiv='2505.19590',
            short='Intuitor (2505.19590)',
            citation=(
                '@article{zhao2025intuitor,\n  title={Learning to Reason without External Rewards},\n  '
                'author={Zhao, Xuandong and Kang, Zhewei and Feng, Aosong and Levine, Sergey and Song, '
                'Dawn},\n  journal={arXiv preprint arXiv:2505.19590},\n  year={2025}\n}'
            ),
        ),
        reference='sunblaze-ucb/Intuitor@3f0cdd7b open-r1-intuitor/src/open_r1/intuitor_trainer.py L835-887',
        fields=("reward_temperature", "self_certainty_positions"),
    ),
)}  # fmt: skip

METHODS = tuple(REGISTRY)
ENTROPY_METHODS = tuple(n for n, m in REGISTRY.items() if m.family == "entropy")
GRPO_METHODS = tuple(n for n, m in REGISTRY.items() if m.family == "grpo")
METHOD_FIELDS = tuple(dict.fromkeys(f for m in REGISTRY.values() for f in m.fields))


def get_method(name: str) -> Method:
    """The registry entry of ``name``; a one-line error naming the allowed methods otherwise."""
    from zerosiam_llm.errors import UserInputError

    if name not in REGISTRY:
        raise UserInputError(f"method: {name!r} is not allowed; allowed: {', '.join(METHODS)}")
    return REGISTRY[name]


def unused_fields(method: str, fields) -> list[str]:
    """Those of ``fields`` that are method-specific and that ``method`` does not read."""
    own = set(REGISTRY[method].fields)
    return [f for f in fields if f in METHOD_FIELDS and f not in own]
