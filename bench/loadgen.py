"""Load from client processes: start ``clients`` processes running ``target(*args, queue)``
for about ``seconds`` and collect what each one puts on the queue."""
import multiprocessing


def run_clients(target, args, clients, seconds):
    """Run the client processes to their end; return their results, one per process."""
    queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=target, args=(*args, queue)) for _ in range(clients)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=seconds + 60) for _ in procs]
    for proc in procs:
        proc.join()
    return results
