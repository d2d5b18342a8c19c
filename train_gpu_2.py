"""Train MyModel on CIFAR-10 on the best device there is, with .to(device) (lesson P30, "method two").

    python train_gpu_2.py                  # 30 epochs on cuda, else mps (Apple GPU), else cpu
    python train_gpu_2.py --device cpu --epochs 3
    python train_gpu_2.py --recipe fast --epochs 5
    python train_gpu_2.py --resume         # continue a run stopped with Ctrl+C

The device is chosen once; the model, the loss functions and every batch are moved to it with
.to(device). Checkpoints go to model/, TensorBoard logs to logs/<run>/ (tensorboard --logdir logs).
What the lessons do not have is a helper from training/, named where it is used.
"""
import torch
from torch import nn

from model import MyModel
from training.batches import make_batches
from training.cli import run
from training.console import describe_run, epoch_line, progress_bar, summary_line
from training.data import load_training_data
from training.device import Autocast, device_note, select_device, use_fast_paths
from training.folders import CheckpointFolder
from training.meters import TestMeter, TrainMeter
from training.progress import restore
from training.recipe import clip_gradients, lr_schedule, make_optimizer, set_learning_rate, test_time_average
from training.settings import training_settings
from training.setup_check import setup_report
from training.signals import GracefulStop
from training.tblog import RunLog


def main(argv=None):
    # settings: the tutorial's defaults, a --recipe's, or those of the run that --resume continues
    args, resumed = training_settings(argv, __file__, __doc__, epochs=30, device_flag=True)

    # the device, chosen once
    device = select_device(args.device)  # auto: cuda -> mps -> cpu
    print(f'training device: {device}{device_note(device)}')  # and an NVIDIA GPU's problem, if one sits unused

    if args.dry_run:  # the setup check: Python, PyTorch, the GPU, the data, the folders; each problem with its fix
        print(setup_report(args, device))

    # data: CIFAR-10 or your own image folders, cut into batches (see training/batches.py)
    data = load_training_data(args)
    train_batches, test_batches = make_batches(data, args, device, resumed)

    # the model, the loss functions and the optimizer
    torch.manual_seed(args.seed)  # same seed, same initial weights
    model = MyModel(num_classes=len(data.classes))
    model = model.to(device)
    use_fast_paths(model, args, device)  # channels_last, cuDNN autotuning, --compile
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)  # no smoothing in the tutorial recipe
    loss_fn = loss_fn.to(device)
    test_loss_fn = nn.CrossEntropyLoss(reduction='sum')  # the test loss: summed, then per image
    test_loss_fn = test_loss_fn.to(device)
    optimizer = make_optimizer(model, args, train_batches)  # SGD, lr 0.01 in the tutorial recipe (fast: + Muon)
    lr_at = lr_schedule(args, total_steps=args.epochs * len(train_batches))  # --schedule; constant: --lr
    autocast = Autocast(args.precision, device)  # bf16 where the hardware computes it natively, fp16 on older GPUs
    scaler = autocast.grad_scaler()  # fp16 only: scales the loss so that small gradients survive; else a no-op
    progress = restore(resumed, model, optimizer, data.classes, scaler)  # step 0, or where --resume continues

    with CheckpointFolder(args, data.classes, train_batches.normalize) as checkpoints, \
            RunLog(args, progress, data.classes) as writer, GracefulStop() as stop:
        if not args.quiet:
            print(describe_run(args, data, train_batches, autocast, progress, writer.run_dir))
        if resumed is None:
            writer.log_run_start(model, data.train)  # sample images and the model's graph

        for epoch in range(progress.epoch, args.epochs):
            # training: the step of lessons P26-28
            model.train()
            meter = TrainMeter(device, progress.meter)  # running sums, kept on the device
            # this epoch's shuffled batches (after a --resume, the ones not done yet), with a bar in a terminal
            for images, targets in progress_bar(train_batches, epoch, meter.batches, args):
                if stop.requested:  # Ctrl+C or SIGTERM: stop between two steps
                    break
                images = images.to(device)  # costs nothing when the batch is already there (--loader memory)
                targets = targets.to(device)
                with autocast():
                    outputs = model(images)
                    loss = loss_fn(outputs, targets)
                optimizer.zero_grad()
                scaler.scale(loss).backward()  # loss.backward(), with the loss scaled up first under fp16
                clip_gradients(model, args.clip_grad, optimizer, scaler)  # --clip-grad; 0 (off) in the tutorial recipe
                set_learning_rate(optimizer, lr_at(progress.step))
                scaler.step(optimizer)  # optimizer.step(); under fp16 skipped when a gradient overflowed
                scaler.update()

                progress.step += 1
                meter.add(loss, outputs, targets)  # no .item(): it would make the CPU wait for the GPU
                if progress.step % args.log_interval == 0:
                    train_loss = meter.window_loss(progress.step)  # mean since the last log; stops on NaN
                    writer.add_scalar('train_loss', train_loss, progress.step)
                    writer.add_scalar('learning_rate', optimizer.param_groups[0]['lr'], progress.step)
            if stop.requested:  # save where training stands, then exit 130 (Ctrl+C) or 143 (SIGTERM)
                checkpoints.save_last(model, optimizer, progress, meter)
                raise stop.interrupted(checkpoints.resume_hint(progress.step))
            train = meter.result(progress.step)  # the epoch's mean loss and accuracy

            # testing: lesson P27's test loop
            model.eval()
            tester = TestMeter(device, keep_outputs=epoch == args.epochs - 1)  # all outputs at the end
            with torch.no_grad():
                for images, targets in test_batches:
                    images = images.to(device)
                    targets = targets.to(device)
                    with autocast():
                        outputs = model(images)
                        if args.tta:  # --tta: the mean over the image and its mirror image (--tta-views: moved copies)
                            outputs = test_time_average(model, images, outputs, args, test_batches.black)
                        loss = test_loss_fn(outputs, targets)
                    tester.add(loss, outputs, targets)
            test = tester.result()  # mean loss per image, accuracy, confusion matrix

            # TensorBoard and the epoch's checkpoints
            writer.add_scalar('test_loss', test.loss, epoch)
            writer.add_scalar('test_accuracy', test.accuracy, epoch)
            progress.end_epoch(epoch, train, test)  # and the best accuracy so far
            writer.log_epoch(epoch, model, train, test, progress.best)  # per class, confusion matrix, ...
            path = checkpoints.save_epoch(epoch, model, optimizer, progress)  # model_{epoch}, best, last .pth
            if not args.quiet:
                print(epoch_line(epoch, args.epochs, train, test, path))
        print(summary_line(args, progress, checkpoints, writer))
    return progress


if __name__ == '__main__':
    run(main)
