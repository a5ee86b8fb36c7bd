# bash completion for sip-router.
#
# Install: copy to /usr/share/bash-completion/completions/sip-router (or source it from
# ~/.bashrc).  Completes commands, options, receive methods and files; user ids and
# device ids come from `sip-router --json users` / `registrations` on the configuration
# named on the line (-c FILE), so they need a readable state database.

_sip_router_json_field() {
    # $1: the command to run, $2: the JSON field to list.  Errors are hidden: a missing
    # database or a wrong -c must not spill into the completion.
    local config=() i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            -c | --config) config=(-c "${COMP_WORDS[i + 1]}") ;;
        esac
    done
    "${COMP_WORDS[0]}" "${config[@]}" --json "$1" 2>/dev/null |
        sed -n "s/^ *\"$2\": \"\\([^\"]*\\)\".*/\\1/p" | sort -u
}

_sip_router() {
    local cur prev command="" i
    COMPREPLY=()
    cur="${COMP_WORDS[COMP_CWORD]}"
    prev="${COMP_WORDS[COMP_CWORD - 1]}"
    local commands="check run web edge-config users explain set-method set-phone hash-password
        set-password registrations calls audit status unregister reload"
    local global="-c --config --json -h --help"

    # the command is the first word that is neither an option nor an option's value
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            -c | --config) ((i++)) ;;
            -*) ;;
            *) command="${COMP_WORDS[i]}"; break ;;
        esac
    done

    case "$prev" in
        -c | --config)
            COMPREPLY=($(compgen -f -X '!*.y*ml' -- "$cur") $(compgen -d -- "$cur"))
            return ;;
        --mode) COMPREPLY=($(compgen -W "proxy redirect" -- "$cur")); return ;;
        --as | --user) COMPREPLY=($(compgen -W "$(_sip_router_json_field users user)" -- "$cur")); return ;;
        --limit | --queue | --called) return ;;
    esac

    if [[ -z "$command" ]]; then
        COMPREPLY=($(compgen -W "$commands $global --version" -- "$cur"))
        return
    fi

    # positional words already given after the command (options and their values skipped)
    local positional=0 seen=0
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            -c | --config | --as | --user | --limit | --queue | --called | --mode) ((i++)) ;;
            -*) ;;
            *) if ((seen)); then ((positional++)); else seen=1; fi ;;
        esac
    done

    local options="$global"
    case "$command" in
        explain) options+=" --queue --called --mode" ;;
        set-method | set-phone | set-password) options+=" --as" ;;
        calls) options+=" --user --limit --live" ;;
        audit) options+=" --limit" ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$options" -- "$cur"))
        return
    fi

    case "$command:$positional" in
        check:0) COMPREPLY=($(compgen -f -X '!*.y*ml' -- "$cur") $(compgen -d -- "$cur")) ;;
        explain:0 | set-method:0 | set-phone:0 | set-password:0 | registrations:0 | audit:0)
            COMPREPLY=($(compgen -W "$(_sip_router_json_field users user)" -- "$cur")) ;;
        set-method:1) COMPREPLY=($(compgen -W "all_devices app ip_phone agent_phone" -- "$cur")) ;;
        unregister:0)
            COMPREPLY=($(compgen -W "$(_sip_router_json_field registrations device)" -- "$cur")) ;;
    esac
}

complete -F _sip_router sip-router
