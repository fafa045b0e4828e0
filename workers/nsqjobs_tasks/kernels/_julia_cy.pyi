import numpy as np
import numpy.typing as npt

def escape_counts(
    width: int,
    height: int,
    x_min: float,
    x_max: float,
    y_min: float,
    y_max: float,
    c_re: float,
    c_im: float,
    max_iter: int,
) -> npt.NDArray[np.uint16]: ...
