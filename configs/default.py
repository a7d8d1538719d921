"""Default: a small ResNet on scikit-learn's handwritten digits (ships with sklearn, no download).

1,797 8x8 grayscale images, 10 classes; a fixed stratified held-out split of 360 images. A
two-stage ResNet-18-style network with the small (3x3, stride 1) stem; it trains on a CPU.

This file also defines every config field, with its default, for the other configs (which load
it by path); ``--config.FIELD=VALUE`` can only override fields defined here.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    _data(c)
    _model(c)
    _optimization(c)
    _loop(c)
    _multi_host(c)
    return c


def _data(c: ml_collections.ConfigDict) -> None:
    """Dataset and augmentation (train/data/)."""
    # 'sklearn_digits', 'synthetic', 'image_folder' (data_dir/train/<class>/*, data_dir/val/<class>/*;
    # Grain, no TensorFlow), or a TFDS name ('imagenet2012', 'cifar10', 'imagenette', ...).
    c.dataset = "sklearn_digits"
    c.data_dir = ""  # image_folder: its ROOT; TFDS: data_dir ('' = TFDS default, ~/tensorflow_datasets)
    c.manual_dir = ""  # where manually downloaded archives are (ImageNet's tar files)
    c.download = False  # download and prepare a missing TFDS dataset
    c.train_split = "train"
    c.eval_split = "test"
    c.image_key = "image"
    c.label_key = "label"
    c.image_size = 8  # model input size; TFDS images are cropped/resized to it
    c.train_augment = "pad_crop"  # 'inception_crop', 'pad_crop' (shift), 'none'
    c.crop_padding = 1  # pixels of padding for 'pad_crop'
    # 'inception_crop': the box is drawn as by tf.image.sample_distorted_bounding_box, with this
    # fraction of the image's area, this width/height ratio, and at least this fraction of the
    # whole image inside it (the Inception/ImageNet values).
    c.crop_area_range = (0.08, 1.0)
    c.crop_aspect_ratio_range = (3 / 4, 4 / 3)
    c.crop_min_object_covered = 0.1
    c.random_flip = False  # digits are not mirror-symmetric
    # image_folder, 'inception_crop': decode a JPEG at 1/2, 1/4 or 1/8 scale when its crop is at
    # least that many times the input size (less work on large photos; the pixels differ from a
    # full decode: train/data/image_ops.py).
    c.jpeg_reduced_decode = False
    # image_folder, TFDS: automatic augmentation policies on the uint8 image after crop and flip (before
    # normalisation), as torchvision's reference presets order them (train/data/autoaugment.py,
    # ops in train/augment.py): '' = off; 'ta_wide' (TrivialAugmentWide, 31 bins); 'ra'
    # (RandAugment: ra_num_ops ops at bin ra_magnitude of ra_num_magnitude_bins); 'aa'
    # (AutoAugment, torchvision's IMAGENET policy); timm's 'rand-m9-mstd0.5-inc1' strings (its
    # RandAugment: m, n, p, mstd, mmax, inc as timm parses them; fill: the mean pixel). Draws
    # keyed on (seed, epoch, example).
    c.auto_augment = ""
    c.ra_num_ops = 2
    c.ra_magnitude = 9
    c.ra_num_magnitude_bins = 31
    # image_folder, TFDS: timm's RandomErasing (--reprob, --remode) after normalisation; 0 = off.
    # One box of this area share and log-uniform height/width ratio, filled with zeros ('const') or
    # per-pixel standard normals ('pixel'). Training batches are then normalised float32 from the
    # host instead of uint8 (train/data/erase.py). torchvision's ratio is (0.3, 3.3).
    c.random_erase_prob = 0.0
    c.random_erase_mode = "const"
    c.random_erase_scale = (0.02, 1 / 3)
    c.random_erase_ratio = (0.3, 1 / 0.3)
    # image_folder, TFDS: repeated augmentation (timm's --aug-repeats, RepeatAugSampler; torchvision's
    # --ra-sampler): each image aug_repeats times in a row in the global order, each copy augmented
    # afresh (TFDS: in each host's shard's order); an epoch keeps its length (about 1/aug_repeats of
    # the images). 0 or 1 = off.
    c.aug_repeats = 0.0
    c.eval_crop_fraction = 1.0  # 0.875: resize to size/0.875 then center-crop size (ImageNet)
    # Evaluation at its own size (torchvision's --val-resize-size/--val-crop-size; the model pools
    # globally, so any size runs): the eval input size (0 = image_size), and > 0: resize the
    # shorter side to eval_resize_size, then center-crop eval_image_size, as torchvision's
    # Resize(eval_resize_size, antialias=True) + CenterCrop on uint8 pixels (V2 recipe: 232, 224;
    # overrides eval_crop_fraction). Not for sklearn_digits (fixed 8x8).
    c.eval_image_size = 0
    c.eval_resize_size = 0
    # torchvision's --interpolation: 'bilinear' or 'bicubic', for the eval resize and the
    # inception_crop's resize (RandomResizedCrop's).
    c.interpolation = "bilinear"
    c.normalize_mean = ()  # per channel, in 0..255 pixel units; () = dataset default
    c.class_subset = ()  # sklearn_digits only: train and evaluate on these digits, relabelled 0..k-1
    c.normalize_std = ()
    c.cache = False  # keep the encoded TFDS training shard in memory
    c.shuffle_buffer_size = 16_384
    c.prefetch_to_device = 2  # batches transferred ahead of the step using them
    # image_folder: Grain worker processes decoding images per host (-1: one per core from 3 cores,
    # none on 1-2; 0: none, decode in the training process on read threads), and the batches each
    # keeps ready.
    c.grain_worker_count = -1
    c.grain_worker_buffer_size = 2
    # synthetic data (dataset='synthetic')
    c.synthetic_num_classes = 1000
    c.synthetic_channels = 3
    c.synthetic_num_examples = 1_281_167
    c.synthetic_num_eval_examples = 10_000


def _model(c: ml_collections.ConfigDict) -> None:
    """The network (train/model.py) and its compute precision."""
    c.model = ml_collections.ConfigDict()
    # A resnet_jax preset name ('resnet18', 'resnet50', ...) or 'resnet_base'.
    c.model.arch = "resnet18"
    # Other ResNet (or ResNetBase) fields. Field names may differ per arch, so this is a free dict;
    # --config.model.overrides.FIELD=VALUE sets any of them (train/cli.py), checked at start-up.
    c.model.overrides = ml_collections.ConfigDict(
        {"stage_sizes": (1, 1), "small_stem": True}, type_safe=False
    )
    # timm's regularisers of a ResNet or ResNetV2, in training only (0: off). Dropout before fc
    # (timm's --drop), and stochastic depth: each block's residual branch is dropped per example
    # with a probability rising linearly to this at the last block (timm's --drop-path; RSB A1:
    # 0.05). Draws are keyed on (seed, step), so a resumed run draws the same.
    c.model.drop_rate = 0.0
    c.model.drop_path_rate = 0.0
    # 'float32', 'bfloat16', 'float16' (GPU; dynamic loss scaling), or 'auto' (bfloat16 on
    # TPU/GPU, float32 on CPU); parameters are float32. 'float64' (parameters too; needs
    # JAX_ENABLE_X64=1) is a numerics reference: the float64 twin of a run.
    c.dtype = "float32"


def _optimization(c: ml_collections.ConfigDict) -> None:
    """Batch, length, optimizer and schedule (train/optim.py)."""
    c.batch_size = 64  # global, over all devices and hosts
    c.eval_batch_size = 360
    c.num_epochs = 30
    c.num_train_steps = -1  # > 0 overrides num_epochs
    # 'sgd', 'lars', 'adamw' (torch.optim.AdamW: decoupled weight decay), 'lamb' or 'lambc'
    # (timm.optim.Lamb; 'lambc' caps the trust ratio at 1)
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.nesterov = True
    c.learning_rate = 0.1  # peak
    c.lr_base_batch_size = 0  # > 0: lr = learning_rate * batch_size / lr_base_batch_size
    c.lr_schedule = "cosine"  # 'cosine', 'polynomial', 'constant', 'step' (train/schedules.py)
    c.warmup_epochs = 1.0
    # Warm-up: 'linear' ramps from the start rate to the peak, 'constant' holds the start rate
    # (torchvision's --lr-warmup-method). The start rate is warmup_lr if > 0 (timm's --warmup-lr,
    # absolute), else lr_warmup_decay x the peak (torchvision's --lr-warmup-decay; 0: from 0).
    c.lr_warmup_method = "linear"
    c.lr_warmup_decay = 0.0
    c.warmup_lr = 0.0
    # True: the decay starts after the warm-up (torchvision's SequentialLR). False (timm's
    # default, --warmup-prefix off): the decay spans the whole run, the warm-up replacing its start.
    c.warmup_prefix = True
    c.min_lr = 0.0  # cosine schedule: the rate it ends at (timm's --min-lr, torchvision's --lr-min)
    c.end_learning_rate = 0.0  # polynomial schedule
    c.lr_decay_power = 2.0  # polynomial schedule
    c.lr_step_size = 30  # step schedule: x lr_gamma every lr_step_size epochs (torchvision's flags)
    c.lr_gamma = 0.1
    # True: the rate changes every step (timm's --sched-on-updates). False: once per epoch, held
    # within it, as torchvision's recipes and timm's default step their schedulers.
    c.sched_on_updates = True
    c.weight_decay = 5e-4
    c.weight_decay_on_bn_and_bias = False
    c.opt_betas = (0.9, 0.999)  # 'adamw', 'lamb': Adam's beta1, beta2 (timm's --opt-betas)
    # 'adamw', 'lamb': added to the root of the second moment (timm's --opt-eps; timm's Lamb
    # defaults to 1e-6, so a timm LAMB recipe without --opt-eps sets 1e-6 here)
    c.opt_eps = 1e-8
    # 'lamb': timm's Lamb divides the gradients by max(global norm / this, 1) itself (its
    # max_grad_norm, 1.0 in every timm run); 0 = off.
    c.lamb_max_grad_norm = 1.0
    c.grad_clip_norm = 0.0  # > 0: clip the gradients' global norm to this, as clip_grad_norm_
    # timm's --grad-accum-steps: each step's (per-device) batch is split into this many
    # micro-batches (rows j, j + k, ...), their gradients averaged into one update; BatchNorm
    # normalises each with its own statistics and updates its running ones k times (train/accum.py).
    # batch_size stays the global batch of one update. 0 or 1: off. Not with dtype='float16'.
    c.grad_accum_steps = 1
    c.lars_trust_coefficient = 0.001
    c.lars_eps = 0.0
    # The training loss: 'softmax' (cross-entropy, as torch's CrossEntropyLoss) or 'bce'
    # (sigmoid per class, timm's BinaryCrossEntropy: "ResNet strikes back"). Evaluation reports
    # the softmax cross-entropy either way.
    c.loss = "softmax"
    c.label_smoothing = 0.0  # 0.1: targets s/C off, 1 - s + s/C on; with mixup, smooths the mixed targets
    c.bce_target_threshold = 0.0  # 'bce': targets above it become 1, the rest 0 (0: off; RSB: 0.2)
    c.bce_sum = False  # 'bce': sum over the classes instead of the mean (timm's --bce-sum)
    # Mixup and cutmix in the train step, as timm's Mixup (train/mixup.py); 0 = off. Row i mixes
    # with row B-1-i of the global batch; draws keyed on (seed, step).
    c.mixup_alpha = 0.0  # > 0: mixup, lam ~ Beta(alpha, alpha)
    c.cutmix_alpha = 0.0  # > 0: cutmix, lam ~ Beta(alpha, alpha), a box of area 1 - lam pasted
    c.mixup_prob = 1.0  # probability of mixing a batch, pair or row
    c.mixup_switch_prob = 0.5  # with both alphas > 0: probability of cutmix instead of mixup
    c.mixup_mode = "batch"  # 'batch' (one draw per batch), 'pair' (per pair of rows), 'elem' (per row)
    c.correct_lam = True  # cutmix: lam = 1 - the box's area after clipping to the image
    # cutmix: (min, max) box side / image side, each side drawn uniformly between (timm's
    # --cutmix-minmax; turns cutmix on with alpha 1, so lam only decides whether a row is mixed).
    c.cutmix_minmax = ()
    # Fine-tuning: everything but the classifier (fc) is the backbone. Frozen: its parameters
    # never change (its BatchNorm statistics still update in train mode, as in PyTorch with
    # requires_grad=False). Or train it at backbone_lr_multiplier x the learning rate.
    c.freeze_backbone = False
    c.backbone_lr_multiplier = 1.0
    # EMA of the weights and BatchNorm statistics (train/ema.py), evaluated beside the model
    # (eval/ema_accuracy); export --ema and predict use it. 0 = off, else in [0, 1) (timm's and
    # torchvision's --model-ema-decay). Updated after the optimizer step, keyed on the step.
    c.ema_decay = 0.0
    # 0: timm's ModelEmaV3, every step, with ema_decay as given. N > 0: torchvision's
    # --model-ema-steps: every N steps of an epoch, with its reference script's decay
    # 1 - min(1, (1 - ema_decay) * batch_size * N / epochs), copying the model through the
    # warm-up epochs.
    c.ema_every_steps = 0
    # timm's --model-ema-warmup (ema_every_steps=0): decay min(ema_decay, 1 - n ** (-2/3)) at step n.
    c.ema_warmup = False


def _loop(c: ml_collections.ConfigDict) -> None:
    """Parallelism, logging, evaluation and checkpoint policy (train/loop.py, train/periodic.py)."""
    c.parallelism = "jit"  # 'jit' (over a device mesh) or 'pmap'
    # jit's mesh: 'auto' axes (the compiler propagates shardings) or 'explicit' (sharding in
    # types, jax.make_mesh's default since JAX 0.10). Same results; see docs/sharding.md.
    c.mesh_axis_types = "auto"
    # TPU slices the jit mesh spans (Multislice): data parallel within a slice over ICI and
    # across slices over DCN, as train.aot --num_slices compiles. 0 = from the devices'
    # slice_index (1 on CPU/GPU); a number must match them.
    c.num_slices = 0
    c.seed = 0
    # PRNG for parameter init: '' = JAX's default (threefry2x32). 'rbg' compiles much faster on
    # CPU (seconds per model) but its numbers may differ across backends and JAX versions.
    c.rng_impl = ""
    # Persistent XLA compilation cache: 'auto' = $RESNET_JAX_CACHE_DIR or ~/.cache/resnet_jax/xla;
    # a path; or 'off'. A restarted or repeated run then loads its compiled steps from disk.
    c.compilation_cache_dir = "auto"
    # A file written by `python -m train.aot --save` (may be gs://): its train and eval steps are
    # loaded instead of compiled when JAX/libtpu versions, flags, devices and the lowered program
    # all match this run; otherwise one warning line and a normal compile. '' = compile.
    c.aot_executable = ""
    c.log_every_steps = 20
    c.eval_every_steps = 110  # > 0: every N steps; 0: at the end of every epoch; < 0: never
    c.eval_at_end = True
    c.checkpoint_every_steps = 500  # 0: only the final checkpoint
    c.save_checkpoints = True
    c.keep_checkpoints = 3
    c.eval_only = False  # evaluate a checkpoint (restore_step, default latest) and exit
    c.restore_step = -1
    c.progress_bar = True
    # MFU's denominator: dense bfloat16 peak TFLOP/s per chip. 0 = from train/utilisation.py's table
    # by device kind (TPU v4/v5e/v5p/v6e, H100, H200, A100); no MFU is logged where it has none.
    c.peak_tflops = 0.0
    # jax.profiler trace of steps profile_start_step .. + profile_num_steps - 1 (1-based, as
    # logged) into WORKDIR/plugins/profile/ (TensorBoard's profile plugin); 0 steps = off.
    c.profile_start_step = 10
    c.profile_num_steps = 0
    # Start from other weights ('' = random init; ignored when resuming from this workdir): a
    # PyTorch state_dict file (.pth/.pt/.safetensors), a pretrained name (resnet_jax.pretrained,
    # e.g. 'resnet50.tv2_in1k') or another run's workdir. A classifier with another class count
    # than the dataset's is freshly initialised; everything else loads exactly.
    c.init_from = ""
    c.init_from_torch = ""  # older name of init_from, for PyTorch files
    c.new_head = False  # always re-initialise the classifier (new classes, even of the same count)
    c.init_from_ema = True  # init_from=<workdir>: its EMA weights when it has them (timm's use_ema)

    # --- test-only fault injection (leave at the defaults) ----------------------------------------
    c.debug_nan_step = -1  # >= 0: fill the images of this (0-based) step with NaN
    c.debug_step_delay_s = 0.0  # sleep after each step, so tests can interrupt at a chosen step


def _multi_host(c: ml_collections.ConfigDict) -> None:
    """jax.distributed: several processes (hosts) training one model."""
    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False  # call jax.distributed.initialize()
    c.distributed.coordinator_address = ""  # '' = auto-detect (Cloud TPU, SLURM, ...)
    c.distributed.num_processes = 0  # 0 = auto-detect
    c.distributed.process_id = -1  # -1 = auto-detect
    c.distributed.cpu_collectives = ""  # 'gloo' for multi-process CPU runs
