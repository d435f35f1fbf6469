import sys

from distill.cli import main

# NOTE: the guard matters: vLLM starts its engine in spawned processes, which re-import __main__.
if __name__ == "__main__":
    code = main()
    from distill.training.launch import inside_launch

    if inside_launch():  # a process `accelerate launch` started: see processes.exit_now
        from distill.processes import exit_now

        exit_now(code)
    sys.exit(code)
