"""Every benchmark's category and group names, with their other names (Chinese first), in one table.

`select` matches a name against an item's category, its `category_aliases` and its `groups` with
their aliases from this table, case-insensitively, so ``--categories 物理``, ``physics`` and
``natural_science`` (the KRIS-Bench dimension physics belongs to) all work.

Where the names come from:

- The canonical names are the benchmarks' own identifiers, exactly as their files spell them:
  KRIS-Bench's folder names (github.com/mercurystraw/Kris_Bench, ``KRIS_Bench/<category>/``,
  commit 800662d); GEdit-Bench's ``task_type`` values (github.com/stepfun-ai/Step1X-Edit,
  ``GEdit-Bench/test_gedit_score.py`` GROUPS, commit 570eba6); RISEBench's ``category`` values and
  the sub-tasks of ``gpt_eval.py``'s ``subtask_dic`` (github.com/PhoenixZ810/RISEBench, commit
  5f22651); ImgEdit's ``edit_type`` values (github.com/PKU-YuanGroup/ImgEdit,
  ``Benchmark/Basic/basic_edit.json`` and ``prompts.json``, commit 547185d).
- KRIS-Bench's knowledge groups: three knowledge types (factual, conceptual, procedural) over seven
  dimensions, per the KRIS-Bench paper (arXiv 2505.16707, "22 tasks spanning 7 reasoning dimensions"
  over "Factual, Conceptual, and Procedural" knowledge). The category → dimension → type mapping is
  the one in the evaluation summary script ``eval/gen/kris/summarize.py`` of ByteDance's BAGEL
  (``kris_benchamrk_type`` and ``meta_categories``; read in the fork yinyuanzhang/Bagel, commit
  f8819fc), and lmms-eval's ``lmms_eval/tasks/kris_bench/utils.py`` (EvolvingLMMs-Lab/lmms-eval,
  commit 75571cf) agrees. The paper's 22 tasks are 20 folders: ``temporal_prediction`` holds three
  tasks, told apart by the frame to predict (1: reverse, 2 or 3: intermediate, 4: forward), as
  lmms-eval splits them; the KRIS reader adds that third group.
- Chinese names: none of the four benchmarks publishes Chinese names for its categories (their
  papers, READMEs and data files are in English; GEdit-Bench has Chinese *instructions*, not
  category names), so every Chinese name here is our own plain, standard translation. English
  display names (``Natural Science``, ``Life Progression``) are the benchmarks' own, where they
  print them.
"""

from __future__ import annotations

# benchmark (the reader's name) -> canonical name -> other names that select the same thing
ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "sample": {
        "color": ("颜色", "colour"),
        "add": ("添加",),
        "remove": ("移除", "删除"),
        "replace": ("替换",),
        "background": ("背景",),
        "physics": ("物理",),
    },
    "kris": {
        # categories (folder names)
        "count_change": ("数量变化",),
        "color_change": ("颜色变化",),
        "size_adjustment": ("尺寸调整",),
        "part_completion": ("部件补全",),
        "anomaly_correction": ("异常修正",),
        "viewpoint_change": ("视角变换",),
        "position_movement": ("位置移动",),
        "temporal_prediction": ("时序预测", "Temporal Prediction"),  # also its dimension's name
        "humanities": ("人文",),
        "practical_knowledge": ("实用知识",),
        "biology": ("生物",),
        "chemistry": ("化学",),
        "geography": ("地理",),
        "medicine": ("医学",),
        "mathematics": ("数学",),
        "physics": ("物理",),
        "abstract_reasoning": ("抽象推理",),
        "rule-based_reasoning": ("规则推理",),
        "multi-element_composition": ("多元素组合",),
        "multi-instruction_execution": ("多指令执行",),
        # knowledge types
        "factual": ("事实性知识", "Factual Knowledge", "factual_knowledge"),
        "conceptual": ("概念性知识", "Conceptual Knowledge", "conceptual_knowledge"),
        "procedural": ("程序性知识", "Procedural Knowledge", "procedural_knowledge"),
        # dimensions
        "attribute_perception": ("属性感知", "Attribute Perception"),
        "spatial_perception": ("空间感知", "Spatial Perception"),
        "social_science": ("社会科学", "Social Science"),
        "natural_science": ("自然科学", "Natural Science"),
        "logical_reasoning": ("逻辑推理", "Logical Reasoning"),
        "instruction_decomposition": ("指令分解", "Instruction Decomposition"),
        # the three temporal tasks
        "reverse_prediction": ("逆向预测",),
        "intermediate_prediction": ("中间帧预测",),
        "forward_prediction": ("正向预测",),
    },
    "gedit": {
        "background_change": ("背景更换",),
        "color_alter": ("颜色修改",),
        "material_alter": ("材质修改",),
        "motion_change": ("动作变化",),
        "ps_human": ("人像美化",),
        "style_change": ("风格变换",),
        "subject-add": ("主体添加",),
        "subject-remove": ("主体移除",),
        "subject-replace": ("主体替换",),
        "text_change": ("文字修改",),
        "tone_transfer": ("色调变换",),
    },
    "rise": {
        "temporal_reasoning": ("时间推理", "temporal"),
        "causal_reasoning": ("因果推理", "causal"),
        "spatial_reasoning": ("空间推理", "spatial"),
        "logical_reasoning": ("逻辑推理", "logical"),
        # sub-tasks (RISEBench-360's `subtask` field), as groups
        "life_progression": ("生命演进", "Life Progression"),
        "material_progression": ("材料演变", "Material Progression"),
        "environmental_cycles": ("环境循环", "Environmental Cycles"),
        "societal_transformation": ("社会变迁", "Societal Transformation"),
        "structural_deformation": ("结构形变", "Structural Deformation"),
        "state_transition": ("状态转变", "State Transition"),
        "chemical_and_biological_transformation": ("化学与生物变化", "Chemical and Biological Transformation"),
        "physics_manifestation": ("物理现象", "Physics Manifestation"),
        "component_assembly": ("部件组装", "Component Assembly"),
        "object_arrangement": ("物体排列", "Object Arrangement"),
        "viewpoint_generation": ("视角生成", "Viewpoint Generation"),
        "structural_inference": ("结构推断", "Structural Inference"),
        "layout_reasoning": ("布局推理", "Layout Reasoning"),
        "pattern_prediction": ("规律预测", "Pattern Prediction"),
        "mathematical_derivation": ("数学推导", "Mathematical Derivation"),
        "puzzle_solving": ("谜题求解", "Puzzle Solving"),
    },
    "imgedit": {
        "add": ("添加",),
        "remove": ("移除",),
        "replace": ("替换",),
        "adjust": ("属性调整",),
        "style": ("风格迁移",),
        "action": ("动作编辑",),
        "extract": ("提取",),
        "background": ("背景更换",),
        "compose": ("组合编辑",),
    },
}

# KRIS-Bench category -> (knowledge type, dimension); sources in the module docstring.
KRIS_GROUPS: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("count_change", "color_change", "size_adjustment", "part_completion", "anomaly_correction"),
                    ("factual", "attribute_perception")),
    **dict.fromkeys(("viewpoint_change", "position_movement"), ("factual", "spatial_perception")),
    "temporal_prediction": ("factual", "temporal_prediction"),
    **dict.fromkeys(("humanities", "practical_knowledge"), ("conceptual", "social_science")),
    **dict.fromkeys(("biology", "chemistry", "geography", "medicine", "mathematics", "physics"),
                    ("conceptual", "natural_science")),
    **dict.fromkeys(("abstract_reasoning", "rule-based_reasoning"), ("procedural", "logical_reasoning")),
    **dict.fromkeys(("multi-element_composition", "multi-instruction_execution"),
                    ("procedural", "instruction_decomposition")),
}

# KRIS-Bench temporal_prediction: the frame to predict (1-4) -> its task.
KRIS_TEMPORAL_TASKS: dict[int, str] = {1: "reverse_prediction", 2: "intermediate_prediction",
                                       3: "intermediate_prediction", 4: "forward_prediction"}


def aliases(benchmark: str, name: str) -> tuple[str, ...]:
    """The other names of `benchmark`'s category or group `name` (empty when the table has none)."""
    return ALIASES.get(benchmark, {}).get(name, ())


def names_of(category: str, benchmark: str | None = None) -> set[str]:
    """Every name that selects `category`, casefolded: itself, its aliases, and the groups the table
    knows it by with their aliases. With no `benchmark`, every benchmark's table is asked."""
    tables = [benchmark] if benchmark is not None else list(ALIASES)
    names = {category}
    for table in tables:
        groups = KRIS_GROUPS.get(category, ()) if table == "kris" else ()
        for name in (category, *groups):
            names |= {name, *aliases(table, name)}
    return {name.casefold() for name in names}
