"""Small ResNets (under 5M parameters) on CIFAR-10: the original study's five architectures and
sweeps, trained by one loop from a registry of named experiments.

    import common
    run = common.train("res_512_d", epochs=1, subset=1000)
"""
from .charts import make_charts, plot_run
from .config import Config, UserError
from .experiments import EXPERIMENTS, get_experiment
from .models import ARCHITECTURES, build_model, count_parameters
from .models import summary as model_summary
from .predict import predict, show_predictions
from .training import Run, train

__all__ = ["ARCHITECTURES", "EXPERIMENTS", "Config", "Run", "UserError", "build_model",
           "count_parameters", "get_experiment", "make_charts", "model_summary", "plot_run",
           "predict", "show_predictions", "train"]
