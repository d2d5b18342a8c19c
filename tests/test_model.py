"""MyModel keeps the tutorial's layers, names and shapes."""
import runpy

import torch

from conftest import ROOT
from model import MyModel


def test_python_model_py_prints_the_output_shape(capsys):
    runpy.run_path(str(ROOT / 'model.py'), run_name='__main__')
    assert capsys.readouterr().out.splitlines()[0] == 'torch.Size([64, 10])'  # then the table of layers


def test_state_dict_matches_the_tutorial_layout():
    shapes = {k: tuple(v.shape) for k, v in MyModel().state_dict().items()}
    assert shapes == {
        'model.0.weight': (32, 3, 5, 5), 'model.0.bias': (32,),
        'model.2.weight': (32, 32, 5, 5), 'model.2.bias': (32,),
        'model.4.weight': (64, 32, 5, 5), 'model.4.bias': (64,),
        'model.7.weight': (64, 1024), 'model.7.bias': (64,),
        'model.8.weight': (10, 64), 'model.8.bias': (10,),
    }


def test_number_of_classes_is_a_parameter():
    assert MyModel(num_classes=3)(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_a_state_dict_saved_the_tutorial_way_loads(tmp_path):
    torch.manual_seed(0)
    original = MyModel()
    torch.save(original.state_dict(), tmp_path / 'model_29.pth')  # what the tutorial's train.py writes
    restored = MyModel()
    restored.load_state_dict(torch.load(tmp_path / 'model_29.pth', weights_only=True))
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(original(x), restored(x))
