"""attend against diffusers one SD 1.5 UNet call at a time (random weights, CFG batch 2, fp32,
CPU, 2 threads): both programs load once and stay resident, then take turns call by call, the
order swapped every pair, with a pause between calls so neither one's idle threads overlap the
other's call. A pair's two calls lie seconds apart, so the machine's drift over minutes (which
moves both programs' times by 5-10% here) cancels in each pair's ratio. Prints each pair and the
median, lowest and highest ratio as text, then one JSON line.

Usage: scripts/bench_unet_paced.py [--size 512] [--pairs 12] [--capture] [--products f32|bf16]
       [--attend PATH] [--python PATH] [--pause 1.0]
"""
import argparse, json, os, statistics, subprocess, sys, time

parser = argparse.ArgumentParser()
parser.add_argument("--size", type=int, default=512, help="image size in pixels")
parser.add_argument("--pairs", type=int, default=12, help="timed pairs of calls")
parser.add_argument("--capture", action="store_true", help="attend captures attention as the editor does")
parser.add_argument("--products", choices=["f32", "bf16"], default="f32",
                    help="attend's product precision (diffusers stays fp32)")
parser.add_argument("--attend", default="target/release/attend")
parser.add_argument("--python", default=sys.executable, help="python with torch and diffusers")
parser.add_argument("--pause", type=float, default=1.0, help="seconds between calls")
args = parser.parse_args()
os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

attend_cmd = [args.attend, "bench", "unet", "--random-weights", "tests/fixtures/manifests/sd15.json",
              "--width", str(args.size), "--height", str(args.size), "--iters", str(args.pairs), "--paced",
              "--products", args.products]
if args.capture:
    attend_cmd.append("--capture")
diffusers_cmd = [args.python, "scripts/bench_diffusers_unet.py", str(args.size), str(args.pairs), "--paced"]


def start(cmd):
    process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline().strip()
    if line != "ready":
        sys.exit(f"{cmd[0]} did not get ready (said {line!r}, exit code {process.poll()})")
    return process


def timed_call(process, name):
    process.stdin.write("go\n")
    process.stdin.flush()
    line = process.stdout.readline().strip()
    try:
        return float(line)
    except ValueError:
        sys.exit(f"{name} gave no time (said {line!r}, exit code {process.poll()})")


# One program loads and warms up while the other waits, so neither load slows the other's warm-up.
programs = {"attend": start(attend_cmd)}
programs["diffusers"] = start(diffusers_cmd)
pairs = []
for index in range(args.pairs):
    order = ["attend", "diffusers"] if index % 2 == 0 else ["diffusers", "attend"]
    seconds = {}
    for name in order:
        time.sleep(args.pause)
        seconds[name] = timed_call(programs[name], name)
    ratio = seconds["attend"] / seconds["diffusers"]
    pairs.append((seconds["attend"], seconds["diffusers"], ratio))
    print(f"pair {index + 1} ({order[0]} first): attend {seconds['attend']:.3f} s, "
          f"diffusers {seconds['diffusers']:.3f} s, ratio {ratio:.3f}", flush=True)
for process in programs.values():
    process.stdin.close()
    process.stdout.read()
    process.wait()
ratios = [pair[2] for pair in pairs]
summary = {
    "size": args.size, "capture": args.capture, "products": args.products, "pairs": len(pairs),
    "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
    "attend_median_secs": statistics.median(p[0] for p in pairs),
    "diffusers_median_secs": statistics.median(p[1] for p in pairs),
    "load": os.getloadavg()[0],
}
print(f"median ratio {summary['median_ratio']:.3f} (lowest {summary['min_ratio']:.3f}, highest "
      f"{summary['max_ratio']:.3f}) over {len(pairs)} pairs; attend median "
      f"{summary['attend_median_secs']:.3f} s, diffusers {summary['diffusers_median_secs']:.3f} s")
print(json.dumps(summary))
