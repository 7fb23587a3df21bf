"""Matrix layouts for RGO: which axes of each parameter the projection matrix P acts on."""

from rgo_jax._layout import BIAS as BIAS
from rgo_jax._layout import CONV as CONV
from rgo_jax._layout import DENSE as DENSE
from rgo_jax._layout import TRANSFORMER_RULES as TRANSFORMER_RULES
from rgo_jax._layout import LayoutRules as LayoutRules
from rgo_jax._layout import LayoutSpec as LayoutSpec
from rgo_jax._layout import MatrixLayout as MatrixLayout
from rgo_jax._layout import default_layout as default_layout
from rgo_jax._layout import layout_rules as layout_rules
from rgo_jax._layout import path_str as path_str
from rgo_jax._layout import resolve_layouts as resolve_layouts
from rgo_jax._layout import stacked as stacked
