//! Inspecting one container, whatever name the engine gives its state.
//!
//! Podman's Docker-compatible inspect turns its `configured` state into
//! Docker's `created`, but passes `stopped` (the process has exited and
//! Podman's own clean-up has not run yet) and `stopping` through, and
//! bollard's typed answer rejects the whole container for them (`unknown
//! variant`). A sandbox caught in that moment could not be inspected:
//! `sandbox list` and `sandbox stop` failed on it, gc could not tell whether
//! it was gone, and the OOM check fell back to the kernel's count. So when
//! the typed answer does not decode, the same answer (bollard hands it back,
//! `json_data_content`) is read again with Podman's word replaced by
//! Docker's for the same situation. The listing has the same problem
//! (`listing.rs`) and reads its states through the same [`docker_word`].

use bollard::errors::Error as BollardError;
use bollard::models::ContainerInspectResponse;

use crate::Engine;

/// The engine's inspect answer for `container`, typed.
pub async fn container(
    engine: &Engine,
    container: &str,
) -> Result<ContainerInspectResponse, BollardError> {
    match engine.docker.inspect_container(container, None).await {
        Err(BollardError::JsonDataError { contents, .. }) => read_leniently(&contents),
        answer => answer,
    }
}

/// An inspect answer whose `State.Status` is Podman's own word, read with
/// Docker's word for the same situation.
fn read_leniently(answer: &str) -> Result<ContainerInspectResponse, BollardError> {
    let mut value: serde_json::Value = serde_json::from_str(answer)?;
    if let Some(status) = value.pointer_mut("/State/Status") {
        if let Some(docker) = status.as_str().and_then(docker_word) {
            *status = docker.into();
        }
    }
    Ok(serde_json::from_value(value)?)
}

/// Docker's state for a Podman state Docker's schema lacks.
pub(crate) fn docker_word(podman: &str) -> Option<&'static str> {
    match podman {
        // The process has exited; only Podman's bookkeeping is left.
        "stopped" => Some("exited"),
        // A stop was asked for; the process is still there.
        "stopping" => Some("running"),
        // Known to Podman, never started (Podman maps this one itself).
        "configured" => Some("created"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::ContainerStateStatusEnum;

    /// A Podman 4 inspect answer (trimmed) right after the command exited,
    /// killed by the OOM killer, before Podman's clean-up ran.
    const PODMAN_STOPPED: &str = r#"{"Id":"a1","Name":"/agentkernel-x",
      "State":{"Status":"stopped","Running":false,"Paused":false,"OOMKilled":true,
               "Dead":false,"Pid":0,"ExitCode":137},
      "Config":{"Labels":{"agentkernel.managed":"true"}}}"#;

    #[test]
    fn bollards_typed_inspect_rejects_podmans_stopped_state() {
        // Why this module exists: if bollard ever accepts it, the lenient
        // path is no longer needed.
        assert!(serde_json::from_str::<ContainerInspectResponse>(PODMAN_STOPPED).is_err());
    }

    #[test]
    fn a_stopped_container_reads_as_exited_with_everything_else_kept() {
        let info = read_leniently(PODMAN_STOPPED).unwrap();
        let state = info.state.unwrap();
        assert_eq!(state.status, Some(ContainerStateStatusEnum::EXITED));
        assert_eq!(state.oom_killed, Some(true));
        assert_eq!(state.exit_code, Some(137));
        assert_eq!(info.name.as_deref(), Some("/agentkernel-x"));
        let labels = info.config.unwrap().labels.unwrap();
        assert_eq!(labels["agentkernel.managed"], "true");
    }

    #[test]
    fn podmans_other_words_become_dockers_and_unknown_ones_still_fail() {
        let with = |status: &str| format!(r#"{{"Id":"b2","State":{{"Status":"{status}"}}}}"#);
        let status_of = |status: &str| read_leniently(&with(status)).unwrap().state.unwrap().status;
        assert_eq!(
            status_of("stopping"),
            Some(ContainerStateStatusEnum::RUNNING)
        );
        assert_eq!(
            status_of("configured"),
            Some(ContainerStateStatusEnum::CREATED)
        );
        assert_eq!(
            status_of("running"),
            Some(ContainerStateStatusEnum::RUNNING)
        );
        // A word neither engine is known to use is still an error, not a guess.
        assert!(read_leniently(&with("sideways")).is_err());
    }
}
