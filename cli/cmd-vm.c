/*
 * cli/cmd-vm.c - `ferry vm`: run the reference VMM.
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "vm/vm.h"

static void usage(FILE *f)
{
	fprintf(f,
"usage: ferry vm [OPTIONS]\n"
"Run the reference VMM: a tiny self-verifying guest that dirties memory.\n"
"\n"
"  --mem SIZE          guest RAM (default 1G; K/M/G suffixes; 2 MiB multiple,\n"
"                      at least 64M, at most 8G)\n"
"  --vcpus N           vCPUs (default 1, at most 8); vCPU 0 runs the workload\n"
"  --backend B         kvm | thread | auto (default auto: KVM if it works)\n"
"  --workload SPEC     idle | fill | dirty[,ws=SIZE][,rate=MBPS]\n"
"                      [,pattern=seq|random]  (default idle; rate 0 = flat out)\n"
"  --devices N         virtio-like devices (default 2, at most 1024; more\n"
"                      than 32 need --mem of at most 3G)\n"
"  --bar-layout L      normal | reversed: reversed places the devices' BARs\n"
"                      in the opposite order (as a guest that reprogrammed\n"
"                      them would), so a destination remaps them all\n"
"  --device bulk,size=SIZE[,dirty-rate=MBPS][,precopy=on|off]\n"
"                      a device with SIZE bytes of internal state (VFIO-style\n"
"                      migration; repeatable; precopy on by default)\n"
"  --device-state-channel C  main | multifd: where those devices' final state\n"
"                      goes (parameter device-state-channel; default multifd;\n"
"                      the same on both sides)\n"
"  --tls-creds DIR     migrate over TLS 1.3 with both ends verified: DIR has\n"
"                      ca-cert.pem and server-cert.pem/server-key.pem (as a\n"
"                      destination) or client-cert.pem/client-key.pem (as a\n"
"                      source); scripts/gen-certs.sh makes a test set\n"
"  --tls-authz LIST    as a destination, accept only these client\n"
"                      certificate subjects (';' separated, CN=name or the\n"
"                      whole subject; default: any the CA signed)\n"
"  --control PATH      QMP-style control socket (see 'ferry ctl')\n"
"  --incoming URI      load the VM from URI (file:PATH, tcp:HOST:PORT,\n"
"                      unix:PATH, fd:N) instead of booting it\n"
"  --paused            stay paused after start or load until 'cont'\n"
"  --memfd             back guest RAM with a memfd (default: anonymous)\n"
"  --postcopy          allow postcopy (capability postcopy-ram): needed on\n"
"                      a destination before the source switches to it\n"
"  --prealloc          fault in all guest RAM at start (commits it all); a\n"
"                      destination started ahead then receives faster\n"
"  -h, --help          this text\n"
"\n"
"An incoming VM whose load fails exits with status 1 and a message naming\n"
"what failed and where. FERRY_TRACE=1 traces state transitions.\n");
}

static struct vm *running_vm;

static void on_signal(int sig)
{
	(void)sig;
	if (running_vm)
		vm_request_quit_async(running_vm);
}

int cmd_vm(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "mem", required_argument, NULL, 'm' },
		{ "vcpus", required_argument, NULL, 'c' },
		{ "backend", required_argument, NULL, 'b' },
		{ "workload", required_argument, NULL, 'w' },
		{ "devices", required_argument, NULL, 'd' },
		{ "device", required_argument, NULL, 'D' },
		{ "device-state-channel", required_argument, NULL, 'Y' },
		{ "tls-creds", required_argument, NULL, 'T' },
		{ "tls-authz", required_argument, NULL, 'A' },
		{ "bar-layout", required_argument, NULL, 'L' },
		{ "control", required_argument, NULL, 'S' },
		{ "incoming", required_argument, NULL, 'i' },
		{ "paused", no_argument, NULL, 'p' },
		{ "memfd", no_argument, NULL, 'M' },
		{ "postcopy", no_argument, NULL, 'C' },
		{ "prealloc", no_argument, NULL, 'P' },
		{ "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	struct vm_config cfg = {
		.mem = 1ull << 30, .vcpus = 1, .backend = VM_BACKEND_AUTO,
		.ndevices = 2,
	};
	struct ferry_error err = { 0 };
	struct vm *vm;
	int c, status;

	optind = 1;
	while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (c) {
		case 'm':
			if (vm_parse_size(optarg, &cfg.mem)) {
				cli_err("vm: bad --mem '%s'", optarg);
				return 2;
			}
			break;
		case 'c':
			cfg.vcpus = (unsigned)atoi(optarg);
			break;
		case 'b':
			if (!strcmp(optarg, "kvm"))
				cfg.backend = VM_BACKEND_KVM;
			else if (!strcmp(optarg, "thread"))
				cfg.backend = VM_BACKEND_THREAD;
			else if (!strcmp(optarg, "auto"))
				cfg.backend = VM_BACKEND_AUTO;
			else {
				cli_err("vm: --backend is kvm, thread or auto");
				return 2;
			}
			break;
		case 'w':
			if (vm_parse_workload(optarg, &cfg.workload, &err)) {
				cli_err("vm: --workload: %s", err.msg);
				return 2;
			}
			break;
		case 'd':
			cfg.ndevices = (unsigned)atoi(optarg);
			break;
		case 'D':
			if (vm_parse_device(optarg, &cfg, &err)) {
				cli_err("vm: --device: %s", err.msg);
				return 2;
			}
			break;
		case 'Y':
			if (strcmp(optarg, "main") && strcmp(optarg, "multifd")) {
				cli_err("vm: --device-state-channel is main or multifd");
				return 2;
			}
			cfg.device_state_channel = optarg;
			break;
		case 'T':
			cfg.tls_creds = optarg;
			break;
		case 'A':
			cfg.tls_authz = optarg;
			break;
		case 'L':
			if (strcmp(optarg, "normal") && strcmp(optarg, "reversed")) {
				cli_err("vm: --bar-layout is normal or reversed");
				return 2;
			}
			cfg.bar_reversed = !strcmp(optarg, "reversed");
			break;
		case 'S': cfg.control = optarg; break;
		case 'i': cfg.incoming = optarg; break;
		case 'p': cfg.paused = true; break;
		case 'M': cfg.memfd = true; break;
		case 'C': cfg.postcopy = true; break;
		case 'P': cfg.prealloc = true; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind < argc) {
		cli_err("vm: unexpected argument '%s'", argv[optind]);
		return 2;
	}
	vm = vm_create(&cfg, &err);
	if (!vm) {
		cli_err("vm: %s", err.msg);
		return 1;
	}
	running_vm = vm;
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	if (vm_start(vm, &err)) {
		cli_err("vm: %s", err.msg);
		running_vm = NULL;
		vm_destroy(vm);
		return 1;
	}
	status = vm_main_loop(vm);
	running_vm = NULL;
	vm_destroy(vm);
	return status;
}
