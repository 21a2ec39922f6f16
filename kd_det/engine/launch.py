"""
``launch``: Detectron2's launcher, and several processes on machines without GPUs.

Detectron2 v0.6's ``launch`` hard-codes the NCCL backend and asserts CUDA, so
``--num-gpus N`` could not run on CPUs.  Without CUDA, :func:`launch` spawns the processes
itself on the gloo backend and builds Detectron2's local process group as v0.6 does; in
those CPU workers DDP gets ``device_ids=None`` (v0.6 passes the local rank, which DDP
rejects for CPU modules).  With CUDA it calls Detectron2's launcher unchanged.
"""

__all__ = ["launch"]


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=()):
    """
    ``detectron2.engine.launch`` that also runs several processes without GPUs.

    v0.6's worker asserts CUDA and hard-codes NCCL.  With CUDA available this calls
    Detectron2's launcher unchanged; without it, it spawns ``num_gpus_per_machine``
    CPU processes on the gloo backend and sets up Detectron2's local process group
    the same way v0.6 does.
    """
    import torch
    from detectron2.engine import launch as d2_launch

    world_size = num_machines * num_gpus_per_machine
    if torch.cuda.is_available() or world_size <= 1:
        return d2_launch(
            main_func,
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
        )

    import torch.multiprocessing as mp
    from detectron2.engine.launch import _find_free_port

    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError(
                "dist_url=auto is not supported for multi-machine jobs; give tcp://HOST:PORT"
            )
        dist_url = "tcp://127.0.0.1:{}".format(_find_free_port())
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args),
        daemon=False,
    )


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args):
    import torch.distributed as dist
    from detectron2.utils import comm

    global_rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(
        backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank
    )
    # Detectron2's comm.get_local_rank() reads this group (same construction as v0.6).
    num_machines = world_size // num_per_machine
    for i in range(num_machines):
        ranks = list(range(i * num_per_machine, (i + 1) * num_per_machine))
        pg = dist.new_group(ranks)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = pg
    comm.synchronize()
    _ddp_without_device_ids()
    main_func(*args)


def _ddp_without_device_ids():
    """
    v0.6's ``create_ddp_model`` passes ``device_ids=[local_rank]``, which PyTorch's
    DistributedDataParallel rejects for CPU modules.  In CPU worker processes only,
    make the default ``device_ids=None`` (what DDP expects on CPU).
    """
    from detectron2.engine import defaults

    create = defaults.create_ddp_model
    if getattr(create, "_kd_det_cpu", False):
        return

    def create_ddp_model(model, *, fp16_compression=False, **kwargs):
        kwargs.setdefault("device_ids", None)
        return create(model, fp16_compression=fp16_compression, **kwargs)

    create_ddp_model._kd_det_cpu = True
    defaults.create_ddp_model = create_ddp_model
