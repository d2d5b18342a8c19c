"""The training scripts are the lesson: each shows the tutorial's routine itself, and they differ only in
their docstrings, their default epoch count and their device lines (train_ddp.py: its distributed lines).
A fix to one is a fix to all four: this test fails until the others get it too."""
import ast
import difflib
import re

import pytest

from conftest import ROOT, SCRIPTS

# the lines in which the scripts may differ (after the docstring), one pattern each
ALLOWED = [re.compile(pattern) for pattern in [
    r'args, resumed = training_settings\(argv, __file__, __doc__, epochs=\d+(, device_flag=True)?\)',
    r'from training\.device import [\w, ]+',
    r"device = torch\.device\('cpu'\)",
    r'use_cuda = torch\.cuda\.is_available\(\)',
    r"device = torch\.device\('cuda' if use_cuda else 'cpu'\)",
    r'device = select_device\(args\.device\)( +#.*)?',
    r"print\(f'training device: \{device\}.*",
    r"f' \(CUDA is not available: \{why_no_cuda\(\)\}; so \.cuda\(\) is skipped\)'\)\)",
    r'if use_cuda:( +#.*)?',
    r'(model|loss_fn|test_loss_fn|images|targets) = \1\.(cuda\(\)|to\(device\))( +#.*)?',
]]
# the lines in which train_ddp.py may differ from train_gpu_2.py: the distributed ones
DISTRIBUTED = [re.compile(pattern) for pattern in [
    r'import torch\.distributed as dist',
    r'from torch\.nn\.parallel import DistributedDataParallel',
    r'from training\.device import [\w, ]+',
    r'from training\.distributed import [\w, ]+',
    r'# the device, chosen once',
    r'# the process group: .*',
    r'device = select_device\(args\.device\)( +#.*)?',
    r'group = join_process_group\(args\.device\)( +#.*)?',
    r'device = group\.device',
    r"print\(f'training device: \{device\}.*",
    r"f'\(process \{group\.rank\} of \{group\.world_size\}; .*'\)",
    r'train_batches, test_batches = make_batches\(data, args, device, resumed(, group)?\)( +#.*)?',
    r'model = DistributedDataParallel\(model, device_ids=group\.device_ids\)( +#.*)?',
    r'model\.register_comm_hook\(train_batches, average_over_images\)( +#.*)?',
    r'dist\.destroy_process_group\(\)',
]]
# the routine of lessons P26-P30, in the order each script must show it
ROUTINE = ['training_settings(', 'device = ', 'load_training_data(', 'make_batches(', 'model = MyModel(',
           'loss_fn = nn.CrossEntropyLoss(', 'optimizer = make_optimizer(', 'RunLog(', 'for epoch in range(',
           'model.train()', 'outputs = model(images)', 'loss = loss_fn(outputs, targets)', 'optimizer.zero_grad()',
           'scaler.scale(loss).backward()', 'scaler.step(optimizer)', "writer.add_scalar('train_loss'", 'model.eval()',
           'with torch.no_grad():', 'outputs = model(images)', 'loss = test_loss_fn(outputs, targets)',
           "writer.add_scalar('test_loss'", "writer.add_scalar('test_accuracy'", 'checkpoints.save_epoch(']


def code_lines(script: str) -> list:
    """The script's lines after its module docstring, stripped of indentation."""
    text = (ROOT / script).read_text()
    body_start = ast.parse(text).body[1].lineno  # body[0] is the docstring
    return [line.strip() for line in text.splitlines()[body_start - 1:]]


def unexplained_differences(a: list, b: list, allowed=ALLOWED) -> list:
    """The lines that differ between two scripts and are not device lines (not ``allowed``)."""
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    changed = [line for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != 'equal'
               for line in a[i1:i2] + b[j1:j2]]
    return [line for line in changed if not any(p.fullmatch(line) for p in allowed)]


@pytest.mark.parametrize('a, b', [('train.py', 'train_gpu_1.py'), ('train_gpu_1.py', 'train_gpu_2.py'),
                                  ('train.py', 'train_gpu_2.py')])
def test_the_scripts_differ_only_in_their_device_lines(a, b):
    assert unexplained_differences(code_lines(a), code_lines(b)) == []


def test_train_ddp_differs_from_train_gpu_2_only_in_its_distributed_lines():
    assert unexplained_differences(code_lines('train_gpu_2.py'), code_lines('train_ddp.py'), DISTRIBUTED) == []
    lines = code_lines('train_ddp.py')  # and a change of the routine in train_ddp.py alone is caught
    changed = [line.replace('scaler.update()', 'scaler.update(2.0)') for line in lines]
    assert unexplained_differences(code_lines('train_gpu_2.py'), changed, DISTRIBUTED) == \
        ['scaler.update()', 'scaler.update(2.0)']


def test_the_comparison_catches_a_change_to_one_script():
    lines = code_lines('train_gpu_2.py')
    changed = [line.replace('scaler.update()', 'scaler.update()  # x') if line == 'scaler.update()' else line
               for line in lines]
    assert unexplained_differences(code_lines('train_gpu_1.py'), changed) == ['scaler.update()',
                                                                              'scaler.update()  # x']
    assert unexplained_differences(lines, lines[:-3] + lines[-2:]) != []  # a line missing in one


@pytest.mark.parametrize('script', [*SCRIPTS, 'train_ddp.py'])
def test_each_script_shows_the_routine_in_the_tutorials_order(script):
    lines, position = code_lines(script), 0
    for step in ROUTINE:
        found = next((i for i in range(position, len(lines)) if step in lines[i]), None)
        assert found is not None, f'{script}: {step!r} missing after line {position} of its code'
        position = found + 1
    assert len((ROOT / script).read_text().splitlines()) <= 150
    tree = ast.parse((ROOT / script).read_text())
    functions = [node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.Lambda))]
    assert functions == ['main'], 'no callbacks: the routine is written out in main()'


def moves_in_loops(script: str, move: str) -> dict:
    """Which tensors are moved with ``move`` (.cuda() or .to(device)), outside the loops, in the training
    loop and in the test loop."""
    lines = code_lines(script)
    train_loop = next(i for i, line in enumerate(lines) if line.startswith('for images, targets in progress_bar('))
    test_loop = next(i for i, line in enumerate(lines) if line.startswith('for images, targets in test_batches:'))
    where = {'setup': [], 'train loop': [], 'test loop': []}
    for i, line in enumerate(lines):
        match = re.fullmatch(rf'(\w+) = \1\.{re.escape(move)}( +#.*)?', line)
        if match:
            where['setup' if i < train_loop else 'train loop' if i < test_loop else 'test loop'].append(match[1])
    return where


@pytest.mark.parametrize('script, move', [('train_gpu_1.py', 'cuda()'), ('train_gpu_2.py', 'to(device)'),
                                          ('train_ddp.py', 'to(device)')])
def test_the_device_lines_stand_where_the_lessons_put_them(script, move):
    assert moves_in_loops(script, move) == {'setup': ['model', 'loss_fn', 'test_loss_fn'],
                                            'train loop': ['images', 'targets'], 'test loop': ['images', 'targets']}
    other = 'to(device)' if move == 'cuda()' else 'cuda()'
    assert moves_in_loops(script, other) == {'setup': [], 'train loop': [], 'test loop': []}


def test_train_py_has_no_device_moves():
    for move in ('cuda()', 'to(device)'):
        assert moves_in_loops('train.py', move) == {'setup': [], 'train loop': [], 'test loop': []}


def test_shipped_scripts_import_nothing_from_the_tests():
    for path in [*ROOT.glob('*.py'), *(ROOT / 'training').glob('*.py')]:
        imported = [node for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = [alias.name for node in imported for alias in node.names] + \
            [node.module or '' for node in imported if isinstance(node, ast.ImportFrom)]
        assert not any(name == 'tests' or name.startswith(('tests.', 'conftest')) for name in names), path
