// Command containerd-stargz-grpc is a small stand-alone daemon that serves the
// stargz-snapshotter library (as packaged by Debian) as a containerd proxy
// snapshotter. It exists so that the benchmark harness can compare Brisk with
// stargz-snapshotter on a machine where only the library sources and
// ctr-remote are packaged, but not the daemon itself.
//
// It listens for the containerd snapshots gRPC API on a unix socket; point a
// containerd [proxy_plugins.stargz] entry at that socket.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/keychain/dockerconfig"
	"github.com/moby/sys/mountinfo"
	toml "github.com/pelletier/go-toml"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

const (
	defaultAddress = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
	defaultRoot    = "/var/lib/containerd-stargz-grpc"

	// How long in-flight RPCs may take to finish after a stop signal.
	gracePeriod = 10 * time.Second
)

type options struct {
	address       string
	root          string
	configPath    string
	logLevel      string
	logFormat     string
	keepSnapshots bool
	printConfig   bool
}

func parseFlags(args []string) (*options, error) {
	o := &options{}
	fset := flag.NewFlagSet("containerd-stargz-grpc", flag.ContinueOnError)
	fset.StringVar(&o.address, "address", defaultAddress, "unix socket on which the snapshots gRPC API is served")
	fset.StringVar(&o.root, "root", defaultRoot, "directory for snapshots, metadata and caches")
	fset.StringVar(&o.configPath, "config", "", "TOML file with the stargz service config (optional)")
	fset.StringVar(&o.logLevel, "log-level", "info", "log level: trace, debug, info, warn, error")
	fset.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	fset.BoolVar(&o.keepSnapshots, "keep-snapshots", false,
		"on shutdown only unmount the FUSE layers and keep the snapshots, so that a restarted daemon re-mounts them; "+
			"by default shutdown unmounts everything and drops all snapshots and layer caches")
	fset.BoolVar(&o.printConfig, "print-config", false, "print the effective config as TOML and exit")
	if err := fset.Parse(args); err != nil {
		return nil, err
	}
	if fset.NArg() != 0 {
		return nil, fmt.Errorf("unexpected arguments: %v", fset.Args())
	}
	if o.address == "" || o.root == "" {
		return nil, errors.New("--address and --root must not be empty")
	}
	var err error
	if o.root, err = filepath.Abs(o.root); err != nil {
		return nil, err
	}
	return o, nil
}

// loadConfig reads the service config. Unknown keys are rejected so that a
// typo in a benchmark config does not silently fall back to a default.
func loadConfig(path string) (*service.Config, error) {
	cfg := &service.Config{}
	if path == "" {
		return cfg, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open config: %w", err)
	}
	defer f.Close()
	if err := toml.NewDecoder(f).Strict(true).Decode(cfg); err != nil {
		return nil, fmt.Errorf("parse config %s: %w", path, err)
	}
	if cfg.KubeconfigKeychainConfig.EnableKeychain || cfg.CRIKeychainConfig.EnableKeychain {
		return nil, errors.New("kubeconfig_keychain and cri_keychain are not supported by this build")
	}
	return cfg, nil
}

func setupLogging(level, format string) error {
	lvl, err := logrus.ParseLevel(level)
	if err != nil {
		return err
	}
	logrus.SetLevel(lvl)
	logrus.SetOutput(os.Stderr)
	switch format {
	case "text":
		logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: time.RFC3339Nano})
	case "json":
		logrus.SetFormatter(&logrus.JSONFormatter{TimestampFormat: time.RFC3339Nano})
	default:
		return fmt.Errorf("unknown log format %q", format)
	}
	return nil
}

func describeConfig(cfg *service.Config) logrus.Fields {
	hosts := []string{}
	for name, h := range cfg.ResolverConfig.Host {
		for _, m := range h.Mirrors {
			scheme := "https"
			if m.Insecure {
				scheme = "http"
			}
			hosts = append(hosts, fmt.Sprintf("%s->%s://%s", name, scheme, m.Host))
		}
	}
	sort.Strings(hosts)
	cacheType := func(s string) string {
		if s == "" {
			return "directory"
		}
		return s
	}
	return logrus.Fields{
		"noprefetch":          cfg.NoPrefetch,
		"prefetch_size":       cfg.PrefetchSize,
		"no_background_fetch": cfg.NoBackgroundFetch,
		"http_cache_type":     cacheType(cfg.HTTPCacheType),
		"fs_cache_type":       cacheType(cfg.FSCacheType),
		"mirrors":             strings.Join(hosts, ","),
	}
}

func checkPrerequisites() error {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return fmt.Errorf("/dev/fuse is not available (is the fuse module loaded?): %w", err)
	}
	return nil
}

func listen(address string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(address), 0o711); err != nil {
		return nil, err
	}
	// A socket left behind by a daemon that was killed would make Listen fail.
	if fi, err := os.Lstat(address); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", address)
		}
		if err := os.Remove(address); err != nil {
			return nil, err
		}
	}
	return net.Listen("unix", address)
}

// mountsBelow lists the mount points strictly below dir, deepest first.
func mountsBelow(dir string) ([]string, error) {
	dir = filepath.Clean(dir)
	// PrefixFilter matches dir itself and the paths below it.
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	out := make([]string, 0, len(mounts))
	for _, m := range mounts {
		if m.Mountpoint != dir {
			out = append(out, m.Mountpoint)
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out, nil
}

// mountsUsing lists mount points outside dir whose mount options name a
// path below dir, e.g. a container's overlay rootfs built from our snapshots.
func mountsUsing(dir string) ([]string, error) {
	dir = filepath.Clean(dir)
	mounts, err := mountinfo.GetMounts(nil)
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	var out []string
	for _, m := range mounts {
		if m.Mountpoint == dir || strings.HasPrefix(m.Mountpoint, dir+"/") {
			continue
		}
		if strings.Contains(m.VFSOptions, dir+"/") {
			out = append(out, m.Mountpoint)
		}
	}
	return out, nil
}

// unmountLeftovers unmounts whatever is still mounted below dir. The library
// unmounts its layers itself; this is the safety net for layers it lost track
// of (e.g. a mount that was busy during Close). It reports whether nothing is
// mounted below dir any more.
func unmountLeftovers(ctx context.Context, dir string) bool {
	mounts, err := mountsBelow(dir)
	if err != nil {
		log.G(ctx).WithError(err).Warn("cannot list mounts")
		return false
	}
	clean := true
	for _, mp := range mounts {
		err := syscall.Unmount(mp, syscall.MNT_FORCE)
		if err != nil {
			err = syscall.Unmount(mp, syscall.MNT_DETACH)
		}
		if err != nil {
			clean = false
			log.G(ctx).WithError(err).WithField("mountpoint", mp).Warn("cannot unmount")
		} else {
			log.G(ctx).WithField("mountpoint", mp).Info("unmounted leftover mount")
		}
	}
	return clean
}

func run(o *options) error {
	if err := setupLogging(o.logLevel, o.logFormat); err != nil {
		return err
	}
	cfg, err := loadConfig(o.configPath)
	if err != nil {
		return err
	}
	if o.printConfig {
		out, err := toml.Marshal(*cfg)
		if err != nil {
			return err
		}
		_, err = os.Stdout.Write(out)
		return err
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ctx = log.WithLogger(ctx, logrus.NewEntry(logrus.StandardLogger()))

	// Catch stop signals from here on, so that one arriving while layers are
	// being restored still leads to a clean shutdown once serving starts.
	sigCh := make(chan os.Signal, 2)
	signal.Notify(sigCh, syscall.SIGINT, syscall.SIGTERM)

	if err := checkPrerequisites(); err != nil {
		return err
	}
	if err := os.MkdirAll(o.root, 0o700); err != nil {
		return err
	}
	if err := service.Supported(o.root); err != nil {
		return fmt.Errorf("overlayfs snapshots are not supported under %s: %w", o.root, err)
	}
	removeLayerCaches(ctx, o.root)

	log.G(ctx).WithFields(describeConfig(cfg)).WithField("root", o.root).Info("starting stargz snapshotter")
	sn, err := service.NewStargzSnapshotterService(ctx, o.root, cfg,
		service.WithCredsFuncs(dockerconfig.NewDockerconfigKeychain(ctx)))
	if err != nil {
		return fmt.Errorf("create snapshotter: %w", err)
	}

	l, err := listen(o.address)
	if err != nil {
		shutdownSnapshotter(ctx, sn, o)
		return fmt.Errorf("listen on %s: %w", o.address, err)
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))

	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(l) }()
	log.G(ctx).WithField("address", o.address).Info("serving snapshots API")

	var result error
	select {
	case s := <-sigCh:
		log.G(ctx).WithField("signal", s.String()).Info("shutting down")
	case err := <-serveErr:
		result = fmt.Errorf("grpc server stopped: %w", err)
	}

	// A second signal while shutting down skips the graceful part.
	stopped := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(gracePeriod):
		log.G(ctx).Warn("in-flight requests did not finish in time; stopping")
		srv.Stop()
	case <-sigCh:
		log.G(ctx).Warn("second signal; stopping now")
		srv.Stop()
	}

	shutdownSnapshotter(ctx, sn, o)
	os.Remove(o.address)
	log.G(ctx).Info("stopped")
	return result
}

func shutdownSnapshotter(ctx context.Context, sn snapshots.Snapshotter, o *options) {
	snapshotsDir := filepath.Join(o.root, "snapshotter", "snapshots")
	if o.keepSnapshots {
		// Only take the FUSE layers down; a restarted daemon mounts them again
		// from the metadata kept under root.
		unmountLeftovers(ctx, snapshotsDir)
		return
	}
	// Close removes all snapshot directories, including the upper directories
	// of running containers. If a container still uses one, keep the data and
	// only take the FUSE layers down.
	users, err := mountsUsing(filepath.Join(o.root, "snapshotter"))
	if err != nil || len(users) > 0 {
		entry := log.G(ctx).WithField("mounts", users)
		if err != nil {
			entry = entry.WithError(err)
		}
		entry.Warn("snapshots may still be in use (stop the containers first); keeping them and unmounting only the layers")
		unmountLeftovers(ctx, snapshotsDir)
		return
	}
	// Close unmounts every layer and removes all snapshot directories.
	if err := sn.Close(); err != nil {
		log.G(ctx).WithError(err).Warn("closing snapshotter")
	}
	if !unmountLeftovers(ctx, o.root) {
		log.G(ctx).Warn("mounts remain below root; keeping snapshot metadata")
		return
	}
	// With the snapshot directories gone, the snapshot metadata only points
	// at missing data, and the next start would fail trying to re-mount it.
	// Drop it as well, together with the layer caches.
	if err := os.RemoveAll(filepath.Join(o.root, "snapshotter")); err != nil {
		log.G(ctx).WithError(err).Warn("removing snapshot metadata")
	}
	removeLayerCaches(ctx, o.root)
}

// removeLayerCaches deletes the on-disk layer caches. The library gives every
// resolved layer a fresh temporary directory under root/stargz/httpcache and
// root/stargz/fscache and deletes it only when the layer is released in the
// same process, so whatever a previous process left there is never read again.
func removeLayerCaches(ctx context.Context, root string) {
	for _, name := range []string{"httpcache", "fscache"} {
		dir := filepath.Join(root, "stargz", name)
		if err := os.RemoveAll(dir); err != nil {
			log.G(ctx).WithError(err).WithField("dir", dir).Warn("removing layer cache")
		}
	}
}

func main() {
	o, err := parseFlags(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "containerd-stargz-grpc:", err)
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "containerd-stargz-grpc:", err)
		os.Exit(1)
	}
}
