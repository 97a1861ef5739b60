//! A CRI client making the calls the kubelet makes, for the Kubernetes-node tests: image
//! pulls with the pod's credentials and sandbox config, image status and filesystem info,
//! and the pod and container life cycle, against containerd's CRI plugin or anything in
//! front of it.
//!
//! It is the kubelet's protocol, not its policy: no retries, no image GC, no pod network
//! (pods share the host's network, so no CNI plugin is needed). Every call blocks on a
//! runtime of its own, like the rest of the harness.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use brisk_proto::runtime::v1 as cri;
use cri::image_service_client::ImageServiceClient;
use cri::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

/// How long a container may take to exit on its own before a test gives up on it.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// CRI on one unix socket: both services, or only the image service (a proxy).
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    images: ImageServiceClient<Channel>,
    runtime: RuntimeServiceClient<Channel>,
}

/// A pod sandbox that is running, with the config its containers and pulls must repeat.
pub struct Pod {
    pub id: String,
    pub config: cri::PodSandboxConfig,
}

impl CriClient {
    /// Connects to `socket` (containerd's own socket serves CRI).
    pub fn connect(socket: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let channel = rt
            .block_on(containerd_client::connect(socket))
            .with_context(|| format!("Connecting to CRI on {}", socket.display()))?;
        Ok(Self {
            rt,
            images: ImageServiceClient::new(channel.clone()),
            runtime: RuntimeServiceClient::new(channel),
        })
    }

    /// ImageService and RuntimeService on different sockets, as the kubelet's
    /// `--image-service-endpoint` and `--container-runtime-endpoint` are.
    pub fn connect_split(image_socket: &Path, runtime_socket: &Path) -> Result<Self> {
        let mut client = Self::connect(runtime_socket)?;
        let channel = client
            .rt
            .block_on(containerd_client::connect(image_socket))
            .with_context(|| format!("Connecting to CRI on {}", image_socket.display()))?;
        client.images = ImageServiceClient::new(channel);
        Ok(client)
    }

    /// PullImage as the kubelet sends it for a pod: the image, the pod's pull secret (if
    /// any) and the pod's sandbox config. Returns the image ref CRI answered.
    pub fn pull(
        &self,
        image: &str,
        auth: Option<cri::AuthConfig>,
        pod: Option<&cri::PodSandboxConfig>,
    ) -> Result<String> {
        let mut images = self.images.clone();
        let request = cri::PullImageRequest {
            image: Some(spec(image)),
            auth,
            sandbox_config: pod.cloned(),
        };
        let response = self
            .rt
            .block_on(images.pull_image(request))
            .with_context(|| format!("PullImage {image}"))?;
        Ok(response.into_inner().image_ref)
    }

    /// ImageStatus; `None` when CRI does not have the image.
    pub fn image_status(&self, image: &str) -> Result<Option<cri::Image>> {
        let mut images = self.images.clone();
        let request = cri::ImageStatusRequest {
            image: Some(spec(image)),
            verbose: false,
        };
        let response = self.rt.block_on(images.image_status(request))?;
        Ok(response.into_inner().image)
    }

    pub fn list_images(&self) -> Result<Vec<cri::Image>> {
        let mut images = self.images.clone();
        let request = cri::ListImagesRequest { filter: None };
        Ok(self
            .rt
            .block_on(images.list_images(request))?
            .into_inner()
            .images)
    }

    pub fn image_fs_info(&self) -> Result<cri::ImageFsInfoResponse> {
        let mut images = self.images.clone();
        Ok(self
            .rt
            .block_on(images.image_fs_info(cri::ImageFsInfoRequest {}))?
            .into_inner())
    }

    pub fn remove_image(&self, image: &str) -> Result<()> {
        let mut images = self.images.clone();
        let request = cri::RemoveImageRequest {
            image: Some(spec(image)),
        };
        self.rt
            .block_on(images.remove_image(request))
            .with_context(|| format!("RemoveImage {image}"))?;
        Ok(())
    }

    /// RunPodSandbox for pod `name` on the host's network, its logs under `log_dir`.
    pub fn run_pod(&self, name: &str, log_dir: &Path) -> Result<Pod> {
        std::fs::create_dir_all(log_dir)?;
        let host = cri::NamespaceMode::Node as i32;
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.to_owned(),
                uid: format!("uid-{name}"),
                namespace: "default".to_owned(),
                attempt: 0,
            }),
            // The kubelet sets no hostname for a pod on the host's network: it shares the
            // host's UTS namespace, and runc refuses to set one there.
            hostname: String::new(),
            log_directory: log_dir.display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: host,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut runtime = self.runtime.clone();
        let request = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let id = self
            .rt
            .block_on(runtime.run_pod_sandbox(request))
            .with_context(|| format!("RunPodSandbox {name}"))?
            .into_inner()
            .pod_sandbox_id;
        Ok(Pod { id, config })
    }

    /// CreateContainer `name` in `pod` running `command` from `image`; its id.
    pub fn create_container(
        &self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.to_owned(),
                attempt: 0,
            }),
            image: Some(spec(image)),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(cri::LinuxContainerConfig::default()),
            ..Default::default()
        };
        let mut runtime = self.runtime.clone();
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        Ok(self
            .rt
            .block_on(runtime.create_container(request))
            .with_context(|| format!("CreateContainer {name}"))?
            .into_inner()
            .container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        let mut runtime = self.runtime.clone();
        let request = cri::StartContainerRequest {
            container_id: id.to_owned(),
        };
        self.rt
            .block_on(runtime.start_container(request))
            .with_context(|| format!("StartContainer {id}"))?;
        Ok(())
    }

    pub fn container_status(&self, id: &str) -> Result<cri::ContainerStatus> {
        let mut runtime = self.runtime.clone();
        let request = cri::ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        };
        self.rt
            .block_on(runtime.container_status(request))?
            .into_inner()
            .status
            .context("ContainerStatus without a status")
    }

    /// Polls ContainerStatus, as the kubelet's PLEG does, until the container exited.
    pub fn wait_exited(&self, id: &str) -> Result<cri::ContainerStatus> {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            let status = self.container_status(id)?;
            if status.state == cri::ContainerState::ContainerExited as i32 {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("container {id} did not exit within {EXIT_TIMEOUT:?}: {status:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop_container(&self, id: &str) -> Result<()> {
        let mut runtime = self.runtime.clone();
        let request = cri::StopContainerRequest {
            container_id: id.to_owned(),
            timeout: 10,
        };
        self.rt.block_on(runtime.stop_container(request))?;
        Ok(())
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        let mut runtime = self.runtime.clone();
        let request = cri::RemoveContainerRequest {
            container_id: id.to_owned(),
        };
        self.rt.block_on(runtime.remove_container(request))?;
        Ok(())
    }

    pub fn stop_pod(&self, pod: &Pod) -> Result<()> {
        let mut runtime = self.runtime.clone();
        let request = cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        };
        self.rt.block_on(runtime.stop_pod_sandbox(request))?;
        Ok(())
    }

    pub fn remove_pod(&self, pod: &Pod) -> Result<()> {
        let mut runtime = self.runtime.clone();
        let request = cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        };
        self.rt.block_on(runtime.remove_pod_sandbox(request))?;
        Ok(())
    }

    /// The kubelet's whole run of a one-container pod: pull (with `auth`), sandbox,
    /// container, start, wait for its exit, and tear everything down again. Returns the exit
    /// code and what the container wrote to stdout and stderr.
    pub fn run_to_exit(
        &self,
        pod_name: &str,
        log_dir: &Path,
        image: &str,
        auth: Option<cri::AuthConfig>,
        command: &[&str],
    ) -> Result<(i32, String)> {
        let pod = self.run_pod(pod_name, log_dir)?;
        let outcome = (|| {
            self.pull(image, auth, Some(&pod.config))?;
            let id = self.create_container(&pod, "main", image, command)?;
            self.start_container(&id)?;
            let status = self.wait_exited(&id)?;
            let log = read_log(&log_dir.join("main.log"))?;
            self.stop_container(&id)?;
            self.remove_container(&id)?;
            Ok((status.exit_code, log))
        })();
        self.stop_pod(&pod)?;
        self.remove_pod(&pod)?;
        outcome
    }
}

/// What a container wrote, from CRI's log file: each line is `TIME STREAM TAG TEXT`, where
/// tag `F` ends a line and `P` is part of a longer one.
pub fn read_log(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("Reading container log {}", path.display()))?;
    let mut out = String::new();
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_time, _stream, tag) = (parts.next(), parts.next(), parts.next());
        out += parts.next().unwrap_or_default();
        if tag != Some("P") {
            out.push('\n');
        }
    }
    Ok(out)
}

fn spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}

/// A pull secret of user and password, as the kubelet passes one from a
/// `kubernetes.io/dockerconfigjson` secret.
pub fn basic_auth(username: &str, password: &str) -> cri::AuthConfig {
    cri::AuthConfig {
        username: username.to_owned(),
        password: password.to_owned(),
        ..Default::default()
    }
}
