"""Tools on trained gated models (DESIGN 4, "tools"): fold, export and summary.

- :func:`fold`: same shapes, gated layers -> plain nn.Linear / nn.Conv2d with the evaluation gates folded in.
- :func:`export`: a plain torch.fx GraphModule with the closed units physically removed.
- :func:`summary`: per gated layer, active/total units, parameters and FLOPs before and after export.
"""

from npn_kernels.tools.exporting import export
from npn_kernels.tools.folding import fold
from npn_kernels.tools.graph import ExportError
from npn_kernels.tools.summarize import Summary, summary

__all__ = ["ExportError", "Summary", "export", "fold", "summary"]
